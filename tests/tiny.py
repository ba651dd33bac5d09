"""The embedded pipeline at test size: a micro CLIP on 180 generated records (seconds per stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params, RayParams, load_params
from pipeline.data.sampling import run_sample

from .conftest import REPO
from .test_model_loss import MICRO

TINY_RUN = {
    "train.model.inline": {**MICRO, "text_cfg": {**MICRO["text_cfg"], "vocab_size": 49408}},
    "train.model.expansion": 8,
    "train.variants": {"sparse": {"logit_scale_cap": 50}},
    "sae.source_variant": "sparse", "vlm.variants": ["sparse"], "steer.variant": "sparse",
    "sae.cls_layer": -1,  # the micro ViT's one block (the default, -2, is the last but one)
    "train.global_batch_size": 32,
    "train.epochs": 3,
    "train.optim": {"lr": 0.002, "warmup_steps": 2},
    "train.log_every": 1,
    "train.eval_every": 4,
    "train.checkpoint_every": 3,
    "train.resources_per_worker": {"CPU": 0.5},
    "train.num_workers": 2, "train.threads_per_worker": 1,  # the integration tests exercise DDP over gloo
    "sample.source.generator.num_records": 180,
    "sample.shard_size": 60,
}


def sampled_tiny_params(workdir: Path, overrides: dict[str, Any] | None = None) -> Params:
    """TINY_RUN (plus ``overrides``) writing under ``workdir``, with its data already sampled."""
    params = load_params(REPO / "params.yaml", overrides={
        **TINY_RUN,
        "sample.out_dir": str(workdir / "data"),
        "train.out_dir": str(workdir / "models"),
        "ray.storage_path": str(workdir / "ray_results"),
        **(overrides or {}),
    })
    run_sample(params.sample, RayParams(num_cpus=2))
    return params
