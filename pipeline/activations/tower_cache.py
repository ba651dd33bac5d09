"""The ``tower_cache`` stage: every image and caption of the sample through the locked towers, once.

What is cached and why: :mod:`pipeline.clip.feature_cache`, which also reads it back. The
encoding is the activations' machinery (:mod:`pipeline.activations.pool`): one Ray Data run, one
pool of :class:`TowerEncoder` actors, each set written atomically with a fingerprint of the
weights, the params and its inputs, so a rerun with nothing changed encodes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.activations.inputs import image_rows, image_set, text_set
from pipeline.activations.pool import write_sets
from pipeline.clip.feature_cache import MANIFEST, SETS
from pipeline.clip.model import build_model
from pipeline.clip.towers import cached_weight_files, channels_last
from pipeline.config import ExtractParams, ModelParams
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.data.shards import SPLITS, caption_rows
from pipeline.fingerprint import inputs_fingerprint
from pipeline.io import remove_output_dir, write_json


class TowerEncoder:
    """Ray Data actor: the locked towers, built once; image or text rows -> tower features."""

    def __init__(self, model: dict[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        self.model = channels_last(build_model(ModelParams.model_validate(model)).eval())
        self.preprocess = ClipBatchPreprocessor.for_model(self.model)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        kinds = np.asarray([str(k) for k in batch["kind"]])
        # one table per kind, through a method: calling ``self`` again would re-enter Ray Data's
        # single-threaded wrapper of this actor and wait on itself forever
        return pa.concat_tables([self._encode(kind, {k: np.asarray(v, dtype=object)[kinds == kind] for k, v in batch.items()})
                                 for kind in sorted(set(kinds))])

    def _encode(self, kind: str, batch: dict[str, Any]) -> pa.Table:
        if kind == "text":
            tokens = torch.as_tensor(self.preprocess.tokens([str(t) for t in batch["text"]]))
            features = self.model.tower_features(texts=tokens)["text"]
            if features.ndim == 3:  # a layer's input per token: keep the caption's own tokens (mask 1), flat
                features = [row[row[:, -1] > 0].flatten() for row in features]
        elif kind == "image":  # a feature map (a trainable unit's input) is stored flat
            images = torch.as_tensor(np.stack([self.preprocess.image(b) for b in batch["jpg"]]))
            features = self.model.tower_features(images=images)["image"].flatten(1)
        else:
            raise ValueError(f"tower cache: rows of kind {kind!r}; only image and text rows are cached")
        return pa.table({"key": [str(k) for k in batch["key"]], "group": [str(g) for g in batch["group"]],
                         "split": [str(s) for s in batch["split"]], "set": [str(s) for s in batch["set"]],
                         "text": [str(t) for t in batch["text"]],
                         "feature": pa.array([row.float().numpy() for row in features], type=pa.list_(pa.float32()))})


class CachePlan(NamedTuple):
    """What the tower cache can hold for a model: whether both towers can be cached, why not when
    they cannot, and the shape of a row where it is more than a pooled vector: the channels of a
    text row that is a layer's input per token (hidden width plus the mask), and the [C, H, W] of
    an image row that is a trainable unit's input (None: pooled rows)."""

    cacheable: bool
    why: str = ""
    text_channels: int | None = None
    image_shape: list[int] | None = None


def cache_plan(model_params: ModelParams) -> CachePlan:
    model = build_model(model_params)
    cacheable = model.cacheable_towers()
    if set(cacheable) != {"image", "text"}:
        return CachePlan(False, "the cache needs a locked timm image tower (train.model.lock.image, its batch-norm "
                         "statistics frozen; unlocked groups are fine) and a locked HF text tower "
                         "(train.model.lock.text, its layer norms frozen; unlocked layers are fine) "
                         f"(train.model.towers); cacheable here: {', '.join(cacheable) or 'none'}")
    text_channels = model.clip.text.config.hidden_size + 1 if model.text_cache_layer is not None else None
    image_shape = None
    if model.image_cache_unit is not None:
        with torch.no_grad():
            pixels = torch.zeros(1, 3, model.image_size, model.image_size)
            image_shape = list(model.eval().tower_features(images=pixels)["image"].shape[1:])
    return CachePlan(True, "", text_channels, image_shape)


# What the towers' outputs depend on: not the heads, the caps or the optimiser.
TOWER_KEYS = ("arch", "inline", "checkpoint", "towers", "lock")


def run_feature_cache(model_params: ModelParams, data_dir: str | Path, out_dir: str | Path, batch: ExtractParams,
                      task_cpus: float, enabled: bool = True) -> dict[str, Any]:
    """Encode every image and caption of the sample's splits with the locked towers into
    ``out_dir/{images,texts}``; write ``out_dir/manifest.json`` (also when nothing is cached, with
    the reason, so training and extraction know to run the towers)."""
    import ray.data

    out_dir, data_dir = Path(out_dir), Path(data_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = cache_plan(model_params) if enabled else CachePlan(False, "train.feature_cache is off")
    if not plan.cacheable:
        for name in SETS:
            remove_output_dir(out_dir / name)
        manifest = {"cached": False, "why": plan.why}
        write_json(out_dir / MANIFEST, manifest)
        return manifest
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    splits = list(SPLITS)
    model = model_params.model_dump(mode="json")
    fingerprint = inputs_fingerprint(cached_weight_files(model_params), {k: model[k] for k in TOWER_KEYS})
    sets = {"images": image_set(data_dir, splits, {r["key"] for r in image_rows(data_dir, splits)}),
            "texts": text_set(caption_rows(data_dir, splits))}
    rows = write_sets("tower_cache", sets, out_dir, fingerprint, {"model": model}, batch, task_cpus,
                      actor=TowerEncoder)
    manifest = {"cached": True, "fingerprint": fingerprint, "rows": rows, "text_channels": plan.text_channels,
                "image_shape": plan.image_shape,
                "towers": model_params.towers.model_dump(mode="json"), "lock": model_params.lock.model_dump(mode="json")}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


