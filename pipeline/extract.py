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
        dropped = ("jpg", "text", "meta") if self.kind == "tokens" else ("jpg", "text")
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


def write_set(name: str, out_dir: Path, fingerprint: str, build: Callable[[], Any], encoder_args: dict[str, Any],
              params: ExtractParams, task_cpus: float, actor: type = SparseEncoder) -> dict[str, Any]:
    """Encode one set with ``actor`` instances and write it atomically; skip it when complete."""
    from ray.data import ActorPoolStrategy

    final, tmp = out_dir / name, out_dir / f"{name}.tmp"
    marker = final / COMPLETE
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        log.info("extract: %s is complete, skipping", name)
        return json.loads(marker.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    dataset = build()
    dataset.map_batches(
        actor, fn_constructor_kwargs=encoder_args, batch_size=params.batch_size,
        compute=ActorPoolStrategy(size=params.actors), num_cpus=task_cpus, num_gpus=params.actor_gpus or None,
    ).write_parquet(str(tmp))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*.parquet"))
    record = {"set": name, "rows": rows, "fingerprint": fingerprint}
    write_json(tmp / COMPLETE, record)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return record


def run_extraction(model_dir: str | Path, data_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path,
                   params: ExtractParams, task_cpus: float, params_hash: str) -> dict[str, Any]:
    """Extract every set for one trained model; return the manifest (rows per set, width)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(out_dir)
    model = load_model(model_dir)
    fingerprint = f"{file_sha256(model_dir / 'model.pt')[:16]}-{params_hash}"
    encoder = {"model_dir": str(model_dir)}
    images = image_rows(data_dir, params.splits)
    image_keys = {row["key"] for row in images}
    words = (Path(vocab_dir) / "words.txt").read_text(encoding="utf-8").splitlines()
    tasks = load_zero_shot_tasks(data_dir)
    folder_tasks = {name: {"classes": sorted({r["label"] for r in folder_rows(name, path)}),
                           "templates": FOLDER_TEMPLATES} for name, path in params.labelled_folders.items()}
    test_keys = [r["key"] for r in images if r["split"] == "test"][: params.token_sample]

    sets: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
        "images": (lambda: shard_images(data_dir, params.splits, image_keys), {**encoder, "kind": "image"}),
        "texts": (lambda: ray.data.from_items(caption_rows(data_dir, params.splits)), {**encoder, "kind": "text"}),
        "vocab": (lambda: ray.data.from_items([{"key": w, "text": w} for w in words]), {**encoder, "kind": "text"}),
        "prompts": (lambda: ray.data.from_items(prompt_rows({**tasks, **folder_tasks})), {**encoder, "kind": "text"}),
    }
    if test_keys:
        sets["tokens"] = (lambda: shard_images(data_dir, ["test"], set(test_keys)), {**encoder, "kind": "tokens"})
    crops = data_dir / "eval" / "crops" / "test.tar"
    if crops.is_file():
        sets["crops"] = (lambda: ray.data.read_webdataset(str(crops), decoder=None).map_batches(_crop_columns),
                         {**encoder, "kind": "image"})
    for name, path in params.labelled_folders.items():
        sets[f"labelled/{name}"] = (
            lambda path=path, name=name: ray.data.from_items(folder_rows(name, path)).map_batches(_read_path),
            {**encoder, "kind": "image"},
        )
    if not tasks and not folder_tasks:
        sets.pop("prompts")

    counts = {name: write_set(name, out_dir, fingerprint, build, args, params, task_cpus)["rows"]
              for name, (build, args) in sets.items()}
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
