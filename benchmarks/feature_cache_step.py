"""What the feature cache saves a training step, side by side: locked pretrained towers read from
pixels and tokens, or from the cache's rows.

The Flickr8k preset's towers (EfficientNet-lite0 at 224 px, MiniLM, 32-token captions), one
optimiser step of the pipeline's recipe (:class:`pipeline.clip.recipe.RecipeStep`) on a synthetic
batch, four ways: both towers fully locked, from the inputs and from the cache's pooled rows; the
image tower's last group (lite0's block 6.0 and head) training, from the inputs and from the cache's
feature maps (the input of block 6.0). Every configuration runs the same timed steps on the same
batch in one invocation, so the ratios are measured under the same load.

    python -m benchmarks.feature_cache_step                  # batch 64, 2 threads
    python -m benchmarks.feature_cache_step --batch 256 --steps 3

Writes ``benchmarks/results/feature_cache_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LOCKS = {"fully locked": {"image": True, "text": True},
         "last image group trains": {"image": True, "image_unlocked_groups": 1, "text": True}}


def model_params(lock: dict):
    from pipeline.config import ModelParams

    return ModelParams.model_validate({
        "inline": {"embed_dim": 256, "vision_cfg": {}, "text_cfg": {}}, "expansion": 16, "logit_scale_cap": 50,
        "towers": {"image": "efficientnet-lite0", "text": "all-minilm-l6-v2", "context_length": 32},
        "lock": lock})


def seconds_per_step(lock: dict, cached: bool, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Mean seconds of ``steps`` optimiser steps after one untimed step."""
    from pipeline.clip.loss import SparseClipObjective
    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import RecipeStep, make_optimizer
    from pipeline.config import OptimParams

    torch.manual_seed(0)
    params = model_params(lock)
    model = build_model(params).train()
    if cached:
        with torch.no_grad():
            batch = model.tower_features(batch["image"], batch["text"])
        model.read_cached_inputs(True)
    optim = OptimParams(lr=1e-4, warmup_steps=0)
    step = RecipeStep(model, make_optimizer(model, optim), SparseClipObjective(params), optim, steps + 1)
    step(batch, 0)
    started = time.perf_counter()
    for i in range(steps):
        step(batch, i + 1)
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> None:
    from pipeline.clip.model import build_model
    from pipeline.data.loading import ClipBatchPreprocessor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.feature_cache_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    probe = build_model(model_params(LOCKS["fully locked"]))
    generator = torch.Generator().manual_seed(0)
    captions = ["a dog runs across the grass", "two men sit on a wooden bench in the park",
                "a girl in a pink dress jumps into the water", "a crowd watches a street performer"]
    batch = {"image": torch.randn(args.batch, 3, probe.image_size, probe.image_size, generator=generator),
             "text": torch.as_tensor(ClipBatchPreprocessor.for_model(probe).tokens(
                 [captions[i % len(captions)] for i in range(args.batch)]))}
    rows = []
    for name, lock in LOCKS.items():
        timings = {source: seconds_per_step(lock, source == "cache", batch, args.steps) for source in ("inputs", "cache")}
        rows.append({"lock": name, "seconds_from_inputs": round(timings["inputs"], 4),
                     "seconds_from_cache": round(timings["cache"], 4),
                     "speedup": round(timings["inputs"] / timings["cache"], 1)})
        print(f"{name:24s} a step of {args.batch}: {timings['inputs']:.3f} s from pixels and tokens, "
              f"{timings['cache']:.4f} s from the cache ({timings['inputs'] / timings['cache']:.1f}x)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "feature_cache_step_cpu.json"
    out.write_text(json.dumps({"command": "python -m benchmarks.feature_cache_step", "batch": args.batch,
                               "image_size": probe.image_size, "threads": args.threads, "steps": args.steps,
                               "machine": platform.processor() or platform.machine(), "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
