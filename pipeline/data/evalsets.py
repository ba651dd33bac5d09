"""Labelled evaluation sets derived from the sampled val/test splits.

- ``eval/zeroshot.json``: zero-shot tasks (class names + prompt templates, and where each
  record's label lives in its sidecar), as in CLIP's ImageNet protocol;
- ``eval/retrieval-<split>.parquet``: image-caption retrieval pairs, one row per image with all
  of its captions (Flickr has five; the generator one);
- ``eval/crops/<split>.tar``: object crops labelled by shape, for box classification (the
  paper's Tab 2), from the generator's ground-truth boxes.

Sources without ground truth (a CSV of photos) get retrieval pairs only; labelled folders in the
ImageNet layout are read directly by the metrics stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.concepts import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, WORDS
from pipeline.data.generator import GeneratedRecord, count_word, object_crops
from pipeline.data.records import Record
from pipeline.data.shards import hashed_files, read_split, sample_file, write_shard
from pipeline.io import write_json

EVAL_SPLITS = ("val", "test")

# Prompts for the classes of a labelled image folder (``extract.labelled_folders``: one
# sub-folder per class, e.g. an ImageNet-style validation set): CLIP's plainest templates.
FOLDER_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]

# Prompt templates in the spirit of CLIP's ImageNet ensemble, worded for rendered scenes: one task
# per concept family the generator draws, so that what a model learned is measured family by
# family (a model that reads only colour scores at chance on the rest). ``label`` says where a
# record's class comes from (:data:`LABELS` computes it); the count task's classes are the object
# counts the sampled records hold, found when the eval sets are built.
ZERO_SHOT_TASKS: dict[str, dict[str, Any]] = {
    "shape": {
        "classes": list(SHAPES),
        "templates": ["a {}.", "a picture of a {}.", "an image showing a {}.", "a drawing of a {}.",
                      "a scene with a {} in it."],
        "label": "truth.objects[main].shape",
    },
    "colour": {
        "classes": list(COLOURS),
        "templates": ["something {}.", "a {} object.", "a picture of a {} shape.", "an image of something {}."],
        "label": "truth.objects[main].colour",
    },
    "size": {
        "classes": list(SIZES),
        "templates": ["a {} shape.", "a {} object.", "a picture of a {} shape.", "an image showing something {}."],
        "label": "truth.objects[main].size",
    },
    "position": {
        "classes": list(POSITIONS),
        "templates": ["a shape at the {}.", "an object in the {} of the picture.", "something at the {} of the image."],
        "label": "truth.objects[main].position",
    },
    "background": {
        "classes": list(BACKGROUNDS),
        "templates": ["a shape on a {} background.", "something against a {} background.", "a picture over a {} backdrop."],
        "label": "truth.background",
    },
    "count": {
        "classes": [],
        "templates": ["{} shapes.", "a picture of {} shapes.", "an image with {} objects.", "a scene of {} shapes."],
        "label": "len(truth.objects), as a word",
    },
    "word": {
        "classes": list(WORDS),
        "templates": ['the word "{}".', "a sign that says {}.", 'a label reading "{}".', 'with "{}" written nearby.'],
        "label": "truth.word.text (images with a word only)",
    },
}


def _main(truth: dict[str, Any]) -> dict[str, Any]:
    return truth["objects"][truth["main"]]


# How each task's class is read from a generated record's ground truth (None: no label, not scored).
LABELS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "shape": lambda truth: _main(truth)["shape"],
    "colour": lambda truth: _main(truth)["colour"],
    "size": lambda truth: _main(truth)["size"],
    "position": lambda truth: _main(truth)["position"],
    "background": lambda truth: truth["background"],
    "count": lambda truth: count_word(len(truth["objects"])),
    "word": lambda truth: truth["word"]["text"] if truth.get("word") else None,
}


def main_object(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The ground-truth main object of a generated record, or None for sources without truth."""
    truth = meta.get("truth")
    return _main(truth) if truth else None


def zero_shot_label(meta: dict[str, Any], task: str) -> str | None:
    """The class of a record for ``task``; None for sources without ground truth."""
    truth = meta.get("truth")
    return LABELS[task](truth) if truth and task in LABELS else None


def _tasks_for(records: list[Record]) -> dict[str, dict[str, Any]]:
    """The zero-shot tasks with the count task's classes set to the counts the records hold."""
    counts = sorted({len(r.meta["truth"]["objects"]) for r in records if r.meta.get("truth")})
    return {**ZERO_SHOT_TASKS, "count": {**ZERO_SHOT_TASKS["count"], "classes": [count_word(n) for n in counts]}}


def build_eval_sets(out_dir: str | Path) -> dict[str, Any]:
    """Write every eval set the sampled data supports; return a summary of their sizes and each
    file's sha256 (the manifest's ``eval_sets.files``, checked by every reader of them)."""
    out_dir = Path(out_dir)
    eval_dir = out_dir / "eval"
    summary: dict[str, Any] = {"zeroshot_tasks": [], "retrieval": {}, "crops": {}}
    labelled: list[Record] = []
    for split in EVAL_SPLITS:
        records = list(read_split(out_dir, split)) if (out_dir / split).is_dir() else []
        labelled += [r for r in records if main_object(r.meta)]
        summary["retrieval"][split] = _write_retrieval(records, eval_dir / f"retrieval-{split}.parquet")
        summary["crops"][split] = _write_crops(records, eval_dir / "crops" / f"{split}.tar")
    tasks = _tasks_for(labelled) if labelled else {}
    write_json(eval_dir / "zeroshot.json", {"tasks": tasks})
    summary["zeroshot_tasks"] = sorted(tasks)
    summary["files"] = hashed_files(out_dir, eval_dir)
    return summary


def _write_retrieval(records: list[Record], path: Path) -> int:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[str(record.meta.get("group", record.key))].append(record)
    rows = [
        {"image_key": members[0].key, "group": group,
         "caption_keys": [m.key for m in members], "captions": [m.caption for m in members]}
        for group, members in groups.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image_key", pa.string()), ("group", pa.string()),
                        ("caption_keys", pa.list_(pa.string())), ("captions", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return len(rows)


def _write_crops(records: list[Record], path: Path) -> int:
    crops = []
    for record in records:
        truth = record.meta.get("truth")
        if not truth:
            continue
        generated = GeneratedRecord(record.key, record.jpeg, record.caption, truth)
        for j, (obj, jpeg) in enumerate(object_crops(generated)):
            meta = {"label": obj["shape"], "object": obj, "source_key": record.key, "group": record.key}
            crops.append(Record(f"{record.key}_obj{j}", jpeg, f"a {obj['colour']} {obj['shape']}", meta))
    return write_shard(crops, path) if crops else 0


def load_zero_shot_tasks(out_dir: str | Path) -> dict[str, Any]:
    return json.loads(sample_file(out_dir, "eval/zeroshot.json").read_text())["tasks"]
