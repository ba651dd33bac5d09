"""Activation extraction with Ray Data: every input the analysis needs, encoded once, on disk.

Each set (images, captions, vocabulary words, zero-shot prompts, object crops, per-token
activations of a sample of images, labelled folders, and the same inputs at every evolution
snapshot of training) is an :class:`~pipeline.activations.inputs.InputSet`. All pending sets of a
model go through one Ray Data run mapped by one pool of :class:`SparseEncoder` actors that each
load the model (and its snapshots) once (``num_gpus`` per actor on a GPU cluster, fractional CPUs
here), written as Parquet in the sparse layout of :mod:`pipeline.activations.sparse_io`, partitioned by set
and resumable per set (:mod:`pipeline.activations.pool`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.activations.inputs import (
    FINAL,
    PASSTHROUGH,
    InputSet,
    crop_set,
    folder_rows,
    folder_set,
    image_rows,
    image_set,
    prompt_rows,
    text_set,
)
from pipeline.activations.pool import write_sets
from pipeline.activations.sparse_io import activation_table, evolution_set, sparse_rows
from pipeline.clip.feature_cache import FeatureCache
from pipeline.clip.model import load_model
from pipeline.config import ExtractParams
from pipeline.data.evalsets import FOLDER_TEMPLATES, load_zero_shot_tasks
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.data.shards import caption_rows, sample_file
from pipeline.fingerprint import inputs_fingerprint
from pipeline.io import write_json

log = logging.getLogger(__name__)


class SparseEncoder:
    """Ray Data actor: loads a trained model (and any evolution snapshots) once, encodes rows.

    Each row says its ``kind`` and ``checkpoint`` (a key of ``weights``). Kinds: ``image`` (JPEG
    bytes in ``jpg``), ``text`` (``text``), ``tokens`` (one output row per spatial token of the
    sparse head, for heatmaps), and the vision tower's residual stream after block
    ``residual["layer"]`` (what the SAE supplementary's token SAEs read): ``residual_all`` (every
    token, CLS first) or ``residual`` (``residual["tokens_per_image"]`` random patch tokens per
    image, plus CLS if ``residual["include_cls"]``; the draw is a function of the image key and
    ``residual["seed"]``, so a rerun or another actor picks the same tokens). Token rows carry
    their position in ``token`` (0 = CLS; -1 for whole-input rows). Identifying columns pass
    through unchanged, so keys, splits and labels travel with their activations; every output
    batch has the same schema whatever mix of sets it holds.
    """

    def __init__(self, model_dir: str, weights: dict[str, str] | None = None, threads: int = 1,
                 residual: dict[str, Any] | None = None, feature_cache: str | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {tag: load_model(model_dir, file).to(self.device)
                       for tag, file in (weights or {FINAL: "model.pt"}).items()}
        first = next(iter(self.models.values()))
        self.width = first.width
        self.preprocess = ClipBatchPreprocessor.for_model(first)
        self.residual = residual
        # locked towers: an input the tower cache holds skips its tower (every snapshot shares them)
        use_cache = FeatureCache.available(feature_cache, first.params)
        self.cache = FeatureCache(feature_cache) if use_cache else None
        self.cached_towers = set(first.cacheable_towers()) if use_cache else set()

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
            features = self._encode_text(model, [str(t) for t in batch["text"]])
        elif kind == "image" and (cached := self._cached("image", [str(k) for k in batch["key"]])) is not None:
            features = model.encode_image_features(cached)
        else:
            images = torch.as_tensor(np.stack([self.preprocess.image(b) for b in batch["jpg"]]), device=self.device)
            if kind == "image":
                features = model.encode_image(images)
            elif kind == "residual_cls":  # one row per image, as "image" rows: the CLS token of a block
                features = model.residual_tokens(images, self._residual("cls_layer"))[:, 0]
            else:
                per_token = (model.encode_image_tokens(images)[1] if kind == "tokens"
                             else model.residual_tokens(images, self._residual("layer")))
                columns, features = _token_rows(columns, per_token, self._token_picks(kind, columns["key"],
                                                                                     per_token.shape[1]))
        indices, values = sparse_rows(features)
        return activation_table(columns, indices, values, self.width)

    def _encode_text(self, model, texts: list[str]) -> torch.Tensor:
        if (cached := self._cached("text", texts)) is not None:
            return model.encode_text_features(cached)
        return model.encode_text(torch.as_tensor(self.preprocess.tokens(texts), device=self.device))

    def _cached(self, tower: str, keys: list[str]) -> torch.Tensor | None:
        """The tower cache's rows for a batch (images by key, texts by content), or None when the
        tower is not cached or any input of the batch is missing from the cache."""
        if tower not in self.cached_towers:
            return None
        rows = self.cache.lookup_images(keys) if tower == "image" else self.cache.lookup_texts(keys)
        return None if rows is None else torch.as_tensor(rows, device=self.device)

    def _residual(self, key: str) -> Any:
        if self.residual is None:
            raise ValueError("residual rows need the actor's `residual` settings (layer, tokens_per_image, ...)")
        return self.residual[key]

    def _token_picks(self, kind: str, keys: list[str], grid: int) -> list[list[int]]:
        """Which token positions each image contributes: all of them, or the ``residual`` draw."""
        if kind != "residual":
            return [list(range(grid))] * len(keys)
        cls, count, seed = self._residual("include_cls"), self._residual("tokens_per_image"), self._residual("seed")
        picks = []
        for key in keys:
            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            patches = sorted(1 + rng.choice(grid - 1, size=min(count, grid - 1), replace=False))
            picks.append(([0] if cls else []) + [int(t) for t in patches])
        return picks


def _token_rows(columns: dict[str, list], per_token: torch.Tensor, picks: list[list[int]]
                ) -> tuple[dict[str, list], torch.Tensor]:
    """One output row per picked token of each image: its columns repeated (``meta`` emptied: the
    image rows keep it, once per image), its position in ``token``, its activation vector."""
    rows = [(i, t) for i, tokens in enumerate(picks) for t in tokens]
    out = {k: [values[i] for i, _ in rows] for k, values in columns.items()}
    out["meta"] = [""] * len(rows)
    out["token"] = [t for _, t in rows]
    image_index = torch.as_tensor([i for i, _ in rows], dtype=torch.long)
    token_index = torch.as_tensor([t for _, t in rows], dtype=torch.long)
    return out, per_token[image_index, token_index]


def evolution_weights(model_dir: Path) -> dict[str, str]:
    """The training snapshots saved under ``evolution/`` ({'1pct': 'evolution/1pct.pt', ...}),
    in training order."""
    files = sorted((model_dir / "evolution").glob("*pct.pt"), key=lambda p: float(p.stem.removesuffix("pct")))
    return {p.stem: f"evolution/{p.name}" for p in files}


@dataclass(frozen=True)
class ExtractionPlan:
    """Every set one model's extraction encodes, and what its manifest records beside them."""

    sets: dict[str, InputSet]
    weights: dict[str, str]  # actor weights: FINAL and every evolution snapshot
    words: list[str]
    zero_shot_tasks: dict[str, Any]


def extraction_plan(model_dir: Path, data_dir: Path, vocab_dir: str | Path, params: ExtractParams) -> ExtractionPlan:
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
    crops = sample_file(data_dir, "eval/crops/test.tar")
    if crops.is_file():
        sets["crops"] = crop_set(crops)
    for name, path in params.labelled_folders.items():
        sets[f"labelled_{name}"] = folder_set(name, path)
    if token_keys:
        sets["tokens"] = image_set(data_dir, ["test"], token_keys, kind="tokens")
    snapshots = evolution_weights(model_dir) if params.evolution_vocab else {}
    sets.update(evolution_sets(list(snapshots), data_dir, words[: params.evolution_vocab], test_keys))
    return ExtractionPlan(sets, {FINAL: "model.pt", **snapshots}, words, {**tasks, **folder_tasks})


def run_extraction(model_dir: str | Path, data_dir: str | Path, vocab_dir: str | Path, out_dir: str | Path,
                   params: ExtractParams, task_cpus: float, params_hash: str,
                   feature_cache: str | Path | None = None) -> dict[str, Any]:
    """Extract every set for one trained model; return the manifest (rows per set, width). The
    sample's shards are checked against its manifest as the plan lists them; a set is skipped
    only if its inputs (:meth:`InputSet.fingerprint`) and the weights and params are unchanged.
    ``feature_cache``: the tower cache, read for the inputs it holds when the model's towers are
    the cached ones (the same numbers, without running the locked towers again)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    model_dir, data_dir, out_dir = Path(model_dir).resolve(), Path(data_dir).resolve(), Path(out_dir)
    model = load_model(model_dir)
    plan = extraction_plan(model_dir, data_dir, vocab_dir, params)
    fingerprint = model_fingerprint(model_dir, plan.weights.values(), params_hash)
    counts = write_sets(f"extract-{model_dir.name}", plan.sets, out_dir, fingerprint,
                        {"model_dir": str(model_dir), "weights": plan.weights,
                         "feature_cache": str(Path(feature_cache).resolve()) if feature_cache else None},
                        params, task_cpus,
                        actor=SparseEncoder)
    manifest = {"model_dir": str(model_dir), "width": model.width, "pooling": model.params.pooling,
                "fingerprint": fingerprint, "rows": counts, "vocabulary": len(plan.words),
                "evolution": [tag for tag in plan.weights if tag != FINAL], "zero_shot_tasks": plan.zero_shot_tasks}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def model_fingerprint(model_dir: Path, weights: Iterable[str], *values: Any) -> str:
    """What every set encoded by a model shares: its config, each weights file the actors load
    (the final model and every snapshot) and ``values`` (the params that shape the encoding)."""
    return inputs_fingerprint([model_dir / "config.json", *(model_dir / w for w in weights)], *values)


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
