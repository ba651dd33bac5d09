"""Activation extraction with Ray Data: every input the analysis needs, encoded once, on disk.

Each set (images, captions, vocabulary words, zero-shot prompts, object crops, per-token
activations of a sample of images, labelled folders) is a Ray Dataset mapped by an actor class
that loads its model once (``map_batches`` with ``concurrency`` actors; ``num_gpus`` per actor on
a GPU cluster, fractional CPUs here) and written as Parquet in the sparse layout of
:mod:`pipeline.sparse_io`. A set is written to ``<name>.tmp/`` and renamed when complete, with a
fingerprint of the model and params, so a rerun skips what is already done (resumable per set).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ExtractParams
from pipeline.data.evalsets import load_zero_shot_tasks
from pipeline.data.loading import ClipBatchPreprocessor, split_paths
from pipeline.io import file_sha256, write_json
from pipeline.model import load_model
from pipeline.sparse_io import activation_table, sparse_rows

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"
FOLDER_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


# --------------------------------------------------------------------------- actors


class SparseEncoder:
    """Ray Data actor: loads a trained model once, encodes images or texts to sparse rows.

    ``kind`` is ``image`` (column ``jpg`` of JPEG bytes), ``text`` (column ``text``) or ``tokens``
    (``jpg``; one output row per spatial token, for heatmaps). Every other input column passes
    through unchanged, so keys, splits and labels travel with their activations.
    """

    def __init__(self, model_dir: str, kind: str, weights: str = "model.pt", threads: int = 1):
        torch.set_num_threads(threads)
        self.model = load_model(model_dir, weights)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.kind = kind
        self.preprocess = ClipBatchPreprocessor(self.model.image_size, self.model.context_length)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        dropped = ("jpg", "text", "meta", "task", "label") if self.kind == "tokens" else ("jpg", "text")
        passthrough = {k: list(v) for k, v in batch.items() if k not in dropped}
        if self.kind == "text":
            tokens = torch.as_tensor(self.preprocess.tokens([str(t) for t in batch["text"]]), device=self.device)
            features = self.model.encode_text(tokens)
        else:
            images = torch.as_tensor(np.stack([self.preprocess.image(b) for b in batch["jpg"]]), device=self.device)
            pooled, tokens = self.model.encode_image_tokens(images) if self.kind == "tokens" else (
                self.model.encode_image(images), None)
            if self.kind == "tokens":
                grid = tokens.shape[1]
                passthrough = {k: [v for v in values for _ in range(grid)] for k, values in passthrough.items()}
                passthrough["token"] = [t for _ in range(tokens.shape[0]) for t in range(grid)]
                features = tokens.reshape(-1, tokens.shape[-1])
            else:
                features = pooled
        indices, values = sparse_rows(features)
        return activation_table(passthrough, indices, values, self.model.width)


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


def caption_rows(data_dir: str | Path, splits: list[str]) -> list[dict[str, Any]]:
    rows = []
    for split in splits:
        folder = Path(data_dir) / split
        for index in sorted(folder.glob("shard-*.parquet")) if folder.is_dir() else []:
            for row in pq.read_table(index, columns=["key", "group", "caption"]).to_pylist():
                rows.append({"key": row["key"], "group": row["group"], "split": split, "text": row["caption"]})
    return rows


def shard_images(data_dir: str | Path, splits: list[str], keys: set[str] | None = None):
    """Ray Dataset of JPEGs (+ their JSON sidecar as ``meta``) read from the split shards."""
    import ray.data

    paths = [p for s in splits if (Path(data_dir) / s).is_dir() for p in split_paths(data_dir, s)]
    ds = ray.data.read_webdataset(paths, decoder=None, include_paths=False)
    ds = ds.map_batches(_webdataset_columns, batch_format="numpy")
    return ds.filter(lambda row: row["key"] in keys) if keys is not None else ds


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


def write_sets(group: str, sets: dict[str, Callable[[], Any]], columns: tuple[str, ...], out_dir: Path,
               fingerprint: str, encoder_args: dict[str, Any], params: ExtractParams, task_cpus: float,
               actor: type = SparseEncoder) -> dict[str, int]:
    """Encode several sets of one input kind in a single Ray Data run (one actor pool, models
    loaded once), written partitioned by set; sets already complete for this fingerprint are
    skipped. Each finished set lands atomically in ``out_dir/<set>/`` with its row count."""
    from ray.data import ActorPoolStrategy

    pending = {name: build for name, build in sets.items() if not is_complete(out_dir / name, fingerprint)}
    if pending:
        tmp = out_dir / f".{group}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        parts = [build().map_batches(_tagged, fn_kwargs={"name": name, "columns": columns})
                 for name, build in pending.items()]
        dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        dataset.map_batches(
            actor, fn_constructor_kwargs=encoder_args, batch_size=params.batch_size,
            compute=ActorPoolStrategy(size=params.actors), num_cpus=task_cpus, num_gpus=params.actor_gpus or None,
        ).write_parquet(str(tmp), partition_cols=["set"])
        for name in pending:
            written = tmp / f"set={name}"
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in written.glob("*.parquet"))
            write_json(written / COMPLETE, {"set": name, "rows": rows, "fingerprint": fingerprint})
            shutil.rmtree(out_dir / name, ignore_errors=True)
            written.rename(out_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("extract: %s already complete, skipping", ", ".join(sets))
    return {name: json.loads((out_dir / name / COMPLETE).read_text())["rows"] for name in sets}


def _tagged(batch: dict[str, Any], name: str, columns: tuple[str, ...]) -> dict[str, Any]:
    """Give every set of a group the same columns (missing ones empty), plus its set name."""
    n = len(next(iter(batch.values())))
    out = {c: (np.asarray(batch[c], dtype=object) if c in batch else np.full(n, "", dtype=object)) for c in columns}
    out["set"] = np.full(n, name, dtype=object)
    return out


IMAGE_COLUMNS = ("key", "group", "split", "meta", "label", "jpg")
TEXT_COLUMNS = ("key", "group", "split", "task", "label", "text")


def run_extraction(model_dir: str | Path, data_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path,
                   params: ExtractParams, task_cpus: float, params_hash: str) -> dict[str, Any]:
    """Extract every set for one trained model; return the manifest (rows per set, width)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(out_dir)
    model = load_model(model_dir)
    fingerprint = f"{file_sha256(model_dir / 'model.pt')[:16]}-{params_hash}"
    images = image_rows(data_dir, params.splits)
    image_keys = {row["key"] for row in images}
    words = (Path(vocab_dir) / "words.txt").read_text(encoding="utf-8").splitlines()
    tasks = load_zero_shot_tasks(data_dir)
    folder_tasks = {name: {"classes": sorted({r["label"] for r in folder_rows(name, path)}),
                           "templates": FOLDER_TEMPLATES} for name, path in params.labelled_folders.items()}
    test_keys = {r["key"] for r in images if r["split"] == "test"}
    token_keys = set(sorted(test_keys)[: params.token_sample])

    text_sets: dict[str, Callable[[], Any]] = {
        "texts": lambda: ray.data.from_items(caption_rows(data_dir, params.splits)),
        "vocab": lambda: ray.data.from_items([{"key": w, "text": w} for w in words]),
    }
    if tasks or folder_tasks:
        text_sets["prompts"] = lambda: ray.data.from_items(prompt_rows({**tasks, **folder_tasks}))
    image_sets: dict[str, Callable[[], Any]] = {"images": lambda: shard_images(data_dir, params.splits, image_keys)}
    crops = data_dir / "eval" / "crops" / "test.tar"
    if crops.is_file():
        image_sets["crops"] = lambda: ray.data.read_webdataset(str(crops), decoder=None).map_batches(_crop_columns)
    for name, path in params.labelled_folders.items():
        image_sets[f"labelled_{name}"] = (
            lambda path=path, name=name: ray.data.from_items(folder_rows(name, path)).map_batches(_read_path))

    def run(group, sets, columns, kind):
        return write_sets(group, sets, columns, out_dir, fingerprint, {"model_dir": str(model_dir), "kind": kind},
                          params, task_cpus)

    counts = {**run("text", text_sets, TEXT_COLUMNS, "text"), **run("image", image_sets, IMAGE_COLUMNS, "image")}
    if token_keys:
        counts.update(run("tokens", {"tokens": lambda: shard_images(data_dir, ["test"], token_keys)},
                          IMAGE_COLUMNS, "tokens"))
    manifest = {"model_dir": str(model_dir), "width": model.width, "pooling": model.params.pooling,
                "fingerprint": fingerprint, "rows": counts, "vocabulary": len(words),
                "zero_shot_tasks": {**tasks, **folder_tasks}}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _crop_columns(batch: dict[str, Any]) -> dict[str, Any]:
    metas = [json.loads(bytes(m)) for m in batch["json"]]
    return {"key": np.asarray(batch["__key__"], dtype=object),
            "label": np.asarray([m["label"] for m in metas], dtype=object),
            "jpg": np.asarray(list(batch["jpg"]), dtype=object)}
