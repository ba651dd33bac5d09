"""Activation extraction with Ray Data: every input the analysis needs, encoded once, on disk.

Each set (images, captions, vocabulary words, zero-shot prompts, object crops, per-token
activations of a sample of images, labelled folders, and the same inputs at every evolution
snapshot of training) is a Ray Dataset. All pending sets of a model are unioned into a single
Ray Data run mapped by one pool of actors that each load the model (and its snapshots) once
(``ActorPoolStrategy``; ``num_gpus`` per actor on a GPU cluster, fractional CPUs here), and
written as Parquet in the sparse layout of :mod:`pipeline.sparse_io`, partitioned by set. A
finished set is renamed into place with a fingerprint of the model and params, so a rerun skips
what is already done (resumable per set).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ExtractParams
from pipeline.data.evalsets import load_zero_shot_tasks
from pipeline.data.loading import ClipBatchPreprocessor, split_paths
from pipeline.data.shards import caption_rows
from pipeline.io import file_sha256, write_json
from pipeline.model import load_model
from pipeline.sparse_io import activation_table, evolution_set, sparse_rows

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"
FOLDER_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FINAL = "final"

# Every input row carries these columns (empty where a set has none), so sets of different
# kinds can share one Ray Data run; ``kind`` and ``checkpoint`` tell the actor what to do.
INPUT_COLUMNS = ("key", "group", "split", "meta", "task", "label", "jpg", "text")
TAGS = ("set", "kind", "checkpoint")
PASSTHROUGH = ("key", "group", "split", "meta", "task", "label", "set")


@dataclass(frozen=True)
class InputSet:
    """A set to extract, how to encode it (``kind``) and with which weights (``checkpoint``).

    Its inputs come from exactly one of: ``rows`` (dicts of the input columns, e.g. words:
    every rows-set of a run shares one ``from_items`` dataset), ``shard_keys`` (images of the
    sample's shards: every such set shares one read of the shards, each image fanned out to the
    sets that want it) or ``build`` (any other Ray Dataset). Sharing keeps a run at a handful
    of datasets however many sets and snapshots it extracts: Ray's cost is per task, not per row.
    """

    kind: str = "image"  # image | text | tokens (one output row per spatial token)
    checkpoint: str = FINAL  # a key of the actor's ``weights``
    rows: list[dict[str, Any]] | None = None
    shard_keys: tuple[tuple[str, ...], frozenset[str]] | None = None  # (shard paths, image keys)
    build: Callable[[], Any] | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.rows, self.shard_keys, self.build)) != 1:
            raise ValueError("an InputSet takes exactly one of rows, shard_keys, build")


def text_set(texts: list[dict[str, Any]], checkpoint: str = FINAL) -> InputSet:
    return InputSet("text", checkpoint, rows=texts)


def image_set(data_dir: str | Path, splits: list[str], keys: set[str], kind: str = "image",
              checkpoint: str = FINAL) -> InputSet:
    """Images of the sample's split shards whose key is in ``keys``."""
    paths = tuple(p for s in splits if (Path(data_dir) / s).is_dir() for p in split_paths(data_dir, s))
    return InputSet(kind, checkpoint, shard_keys=(paths, frozenset(keys)))


# --------------------------------------------------------------------------- actors


class SparseEncoder:
    """Ray Data actor: loads a trained model (and any evolution snapshots) once, encodes rows.

    Each row says its ``kind`` (``image``: JPEG bytes in ``jpg``; ``text``: ``text``; ``tokens``:
    one output row per spatial token, for heatmaps) and ``checkpoint`` (a key of ``weights``).
    Identifying columns pass through unchanged, so keys, splits and labels travel with their
    activations; every output batch has the same schema whatever mix of sets it holds.
    """

    def __init__(self, model_dir: str, weights: dict[str, str] | None = None, threads: int = 1):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {tag: load_model(model_dir, file).to(self.device)
                       for tag, file in (weights or {FINAL: "model.pt"}).items()}
        first = next(iter(self.models.values()))
        self.width = first.width
        self.preprocess = ClipBatchPreprocessor(first.image_size, first.context_length)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        groups: dict[tuple[str, str], list[int]] = {}
        for i, (kind, checkpoint) in enumerate(zip(batch["kind"], batch["checkpoint"])):
            groups.setdefault((str(kind), str(checkpoint)), []).append(i)
        tables = [self._encode(kind, self.models[checkpoint], {k: np.asarray(v)[rows] for k, v in batch.items()})
                  for (kind, checkpoint), rows in groups.items()]
        return pa.concat_tables(tables)

    def _encode(self, kind: str, model, batch: dict[str, Any]) -> pa.Table:
        columns = {k: [str(v) for v in batch[k]] for k in PASSTHROUGH}
        columns["token"] = [-1] * len(batch["key"])
        if kind == "text":
            tokens = torch.as_tensor(self.preprocess.tokens([str(t) for t in batch["text"]]), device=self.device)
            features = model.encode_text(tokens)
        else:
            images = torch.as_tensor(np.stack([self.preprocess.image(b) for b in batch["jpg"]]), device=self.device)
            if kind == "tokens":
                _, tokens = model.encode_image_tokens(images)
                grid = tokens.shape[1]
                columns = {k: [v for v in values for _ in range(grid)] for k, values in columns.items()}
                columns["meta"] = [""] * len(columns["key"])  # the images set keeps it, once per image
                columns["token"] = [t for _ in range(tokens.shape[0]) for t in range(grid)]
                features = tokens.reshape(-1, tokens.shape[-1])
            else:
                features = model.encode_image(images)
        indices, values = sparse_rows(features)
        return activation_table(columns, indices, values, self.width)


# --------------------------------------------------------------------------- datasets


def image_rows(data_dir: str | Path, splits: list[str]) -> list[dict[str, Any]]:
    """One row per unique image (first record of each group) of the splits, from shard indexes."""
    rows, seen = [], set()
    for split in splits:
        folder = Path(data_dir) / split
        if not folder.is_dir():
            continue
        for index in sorted(folder.glob("shard-*.parquet")):
            table = pq.read_table(index, columns=["key", "group", "caption"]).to_pylist()
            for row in table:
                if row["group"] not in seen:
                    seen.add(row["group"])
                    rows.append({"key": row["key"], "group": row["group"], "split": split,
                                 "shard": str(index.with_suffix(".tar").resolve())})
    return rows


def _webdataset_columns(batch: dict[str, Any]) -> dict[str, Any]:
    url = [str(u) for u in batch["__url__"]]
    metas = [bytes(m).decode() for m in batch["json"]]
    return {
        "key": np.asarray(batch["__key__"], dtype=object),
        "group": np.asarray([str(json.loads(m).get("group", k)) for m, k in zip(metas, batch["__key__"])], dtype=object),
        "split": np.asarray([Path(u).parent.name for u in url], dtype=object),
        "meta": np.asarray(metas, dtype=object),
        "jpg": np.asarray(list(batch["jpg"]), dtype=object),
    }


def folder_rows(name: str, folder: str | Path) -> list[dict[str, Any]]:
    """An ImageNet-layout folder (one subfolder per class) as rows of (key, label, path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"extract.labelled_folders.{name}: no such folder: {folder}")
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = class_dir.name.replace("_", " ")
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"key": f"{class_dir.name}/{image.name}", "label": label, "path": str(image.resolve())})
    if not rows:
        raise ValueError(f"extract.labelled_folders.{name}: no images in class subfolders of {folder}")
    return rows


def _read_path(batch: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in batch.items() if k != "path"},
            "jpg": np.asarray([Path(p).read_bytes() for p in batch["path"]], dtype=object)}


def prompt_rows(tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"key": f"{task}|{c:04d}|{t:02d}", "task": task, "label": name, "text": template.format(name)}
        for task, spec in tasks.items()
        for c, name in enumerate(spec["classes"])
        for t, template in enumerate(spec["templates"])
    ]


# --------------------------------------------------------------------------- orchestration


def is_complete(folder: Path, fingerprint: str) -> bool:
    marker = folder / COMPLETE
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def write_sets(label: str, sets: dict[str, InputSet], out_dir: Path, fingerprint: str, actor_args: dict[str, Any],
               params: ExtractParams, task_cpus: float, actor: type = SparseEncoder) -> dict[str, int]:
    """Encode several sets in a single Ray Data run (one actor pool, models loaded once), written
    partitioned by set; sets already complete for this fingerprint are skipped. Each finished set
    lands atomically in ``out_dir/<set>/`` with its row count."""
    from ray.data import ActorPoolStrategy

    pending = {name: spec for name, spec in sets.items() if not is_complete(out_dir / name, fingerprint)}
    if pending:
        log.info("%s: encoding %s", label, ", ".join(pending))
        tmp = out_dir / f".{label}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        input_dataset(pending, params, task_cpus).map_batches(
            actor, fn_constructor_kwargs=actor_args, batch_size=params.batch_size,
            compute=ActorPoolStrategy(size=params.actors), num_cpus=task_cpus, num_gpus=params.actor_gpus or None,
        ).write_parquet(str(tmp), partition_cols=["set"])
        for name in pending:
            written = tmp / f"set={name}"
            written.mkdir(parents=True, exist_ok=True)  # an empty set still completes
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in written.glob("*.parquet"))
            write_json(written / COMPLETE, {"set": name, "rows": rows, "fingerprint": fingerprint})
            shutil.rmtree(out_dir / name, ignore_errors=True)
            written.rename(out_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("%s: %s already complete, skipping", label, ", ".join(sets))
    return {name: json.loads((out_dir / name / COMPLETE).read_text())["rows"] for name in sets}


def input_dataset(sets: dict[str, InputSet], params: ExtractParams, task_cpus: float):
    """One Ray Dataset of every input row of ``sets``, tagged with its set, kind and checkpoint."""
    import ray.data

    light = {"num_cpus": task_cpus}  # row shuffling, not encoding: never hold a whole CPU
    parts = []
    rows = [{**row, "set": name, "kind": spec.kind, "checkpoint": spec.checkpoint}
            for name, spec in sets.items() if spec.rows is not None for row in spec.rows]
    if rows:
        blocks = max(params.actors, -(-len(rows) // (params.batch_size * 16)))
        parts.append(ray.data.from_items(rows, override_num_blocks=blocks).map_batches(_filled, **light))
    wanted: dict[str, list[tuple[str, str, str]]] = {}
    for name, spec in sets.items():
        for key in spec.shard_keys[1] if spec.shard_keys else ():
            wanted.setdefault(key, []).append((name, spec.kind, spec.checkpoint))
    if wanted:
        paths = sorted({p for spec in sets.values() if spec.shard_keys for p in spec.shard_keys[0]})
        shards = ray.data.read_webdataset(paths, decoder=None, include_paths=False).map_batches(
            _webdataset_columns, batch_format="numpy", **light)
        parts.append(shards.map_batches(_fan_out, fn_kwargs={"wanted": wanted}, **light))
    for name, spec in sets.items():
        if spec.build is not None:
            parts.append(spec.build().map_batches(_filled, fn_kwargs={"tags": (name, spec.kind, spec.checkpoint)},
                                                  **light))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _filled(batch: dict[str, Any], tags: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """Every input and tag column present (missing ones empty); ``tags`` sets set/kind/checkpoint."""
    n = len(batch["key"])
    out = {c: np.asarray(batch[c], dtype=object) if c in batch else np.full(n, b"" if c == "jpg" else "", dtype=object)
           for c in INPUT_COLUMNS + TAGS}
    if tags:
        out.update({c: np.full(n, value, dtype=object) for c, value in zip(TAGS, tags)})
    return out


def _fan_out(batch: dict[str, Any], wanted: dict[str, list[tuple[str, str, str]]]) -> dict[str, Any]:
    """Each shard image once per set that wants it; images no set wants are dropped."""
    picks = [(i, tags) for i, key in enumerate(batch["key"]) for tags in wanted.get(str(key), ())]
    rows = np.asarray([i for i, _ in picks], dtype=np.int64)
    out = _filled({k: np.asarray(v, dtype=object)[rows] for k, v in batch.items()})
    for j, column in enumerate(TAGS):
        out[column] = np.asarray([tags[j] for _, tags in picks], dtype=object)
    return out


def evolution_weights(model_dir: Path) -> dict[str, str]:
    """The training snapshots saved under ``evolution/`` ({'1pct': 'evolution/1pct.pt', ...}),
    in training order."""
    files = sorted((model_dir / "evolution").glob("*pct.pt"), key=lambda p: float(p.stem.removesuffix("pct")))
    return {p.stem: f"evolution/{p.name}" for p in files}


def run_extraction(model_dir: str | Path, data_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path,
                   params: ExtractParams, task_cpus: float, params_hash: str) -> dict[str, Any]:
    """Extract every set for one trained model; return the manifest (rows per set, width)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(out_dir)
    model = load_model(model_dir)
    fingerprint = f"{file_sha256(model_dir / 'model.pt')[:16]}-{params_hash}"
    images = image_rows(data_dir, params.splits)
    words = (Path(vocab_dir) / "words.txt").read_text(encoding="utf-8").splitlines()
    tasks = load_zero_shot_tasks(data_dir)
    folder_tasks = {name: {"classes": sorted({r["label"] for r in folder_rows(name, path)}),
                           "templates": FOLDER_TEMPLATES} for name, path in params.labelled_folders.items()}
    test_keys = {r["key"] for r in images if r["split"] == "test"}
    token_keys = set(sorted(test_keys)[: params.token_sample])

    sets: dict[str, InputSet] = {
        "texts": text_set(caption_rows(data_dir, params.splits)),
        "vocab": text_set([{"key": w, "text": w} for w in words]),
        "images": image_set(data_dir, params.splits, {r["key"] for r in images}),
    }
    if tasks or folder_tasks:
        sets["prompts"] = text_set(prompt_rows({**tasks, **folder_tasks}))
    crops = data_dir / "eval" / "crops" / "test.tar"
    if crops.is_file():
        sets["crops"] = InputSet(build=lambda: ray.data.read_webdataset(str(crops), decoder=None).map_batches(
            _crop_columns))
    for name, path in params.labelled_folders.items():
        sets[f"labelled_{name}"] = InputSet(
            build=lambda path=path, name=name: ray.data.from_items(folder_rows(name, path)).map_batches(_read_path))
    if token_keys:
        sets["tokens"] = image_set(data_dir, ["test"], token_keys, kind="tokens")
    snapshots = evolution_weights(model_dir) if params.evolution_vocab else {}
    sets.update(evolution_sets(list(snapshots), data_dir, words[: params.evolution_vocab], test_keys))

    counts = write_sets(f"extract-{model_dir.name}", sets, out_dir, fingerprint,
                        {"model_dir": str(model_dir), "weights": {FINAL: "model.pt", **snapshots}}, params, task_cpus)
    manifest = {"model_dir": str(model_dir), "width": model.width, "pooling": model.params.pooling,
                "fingerprint": fingerprint, "rows": counts, "vocabulary": len(words),
                "evolution": list(snapshots), "zero_shot_tasks": {**tasks, **folder_tasks}}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def evolution_sets(tags: list[str], data_dir: Path, words: list[str], test_keys: set[str]) -> dict[str, InputSet]:
    """Test images, their captions and the head of the vocabulary, encoded by every snapshot:
    what feature naming and the modality split need at each point of training (paper Fig 5, 6)."""
    if not tags:
        return {}
    captions, word_rows = caption_rows(data_dir, ["test"]), [{"key": w, "text": w} for w in words]
    sets = {}
    for tag in tags:
        sets[evolution_set(tag, "images")] = image_set(data_dir, ["test"], test_keys, checkpoint=tag)
        sets[evolution_set(tag, "texts")] = text_set(captions, checkpoint=tag)
        sets[evolution_set(tag, "vocab")] = text_set(word_rows, checkpoint=tag)
    return sets


def _crop_columns(batch: dict[str, Any]) -> dict[str, Any]:
    metas = [json.loads(bytes(m)) for m in batch["json"]]
    return {"key": np.asarray(batch["__key__"], dtype=object),
            "label": np.asarray([m["label"] for m in metas], dtype=object),
            "jpg": np.asarray(list(batch["jpg"]), dtype=object)}
