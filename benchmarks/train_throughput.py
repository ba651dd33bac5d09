"""Training throughput and peak memory: dense baseline vs Sparse CLIP heads, side by side.

Each configuration runs in its own subprocess, so its peak memory (CUDA: max allocated; CPU: the
child's max resident set) is its own; every configuration runs the same number of timed steps
on the same synthetic batch in one invocation, so the ratios are measured under the same load.

    python -m benchmarks.train_throughput                        # CPU, the embedded tiny ViT
    python -m benchmarks.train_throughput --arch ViT-B-32 --batch 256 --device cuda

Results go to ``benchmarks/results/train_throughput_<device>_<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(arch: str | None, expansion: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    """Time ``steps`` optimiser steps of one configuration (run inside a fresh subprocess)."""
    import torch

    from pipeline.clip.loss import SparseClipObjective
    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import make_optimizer
    from pipeline.config import ModelParams, OptimParams

    params = ModelParams(arch=arch, expansion=expansion, activation="none" if expansion == 0 else "relu",
                         logit_scale_cap=50)
    model = build_model(params).to(device)
    objective = SparseClipObjective(params)
    optimizer = make_optimizer(model, OptimParams(lr=1e-4))
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    texts = torch.randint(1, 49000, (batch, model.context_length), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            loss = objective(model(images, texts))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "expansion": expansion, "width": model.width, "batch": batch, "steps": steps,
        "samples_per_s": batch * steps / elapsed, "step_ms": 1000 * elapsed / steps,
        "peak_memory_mib": peak / 2**20,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="open_clip config name (default: the embedded tiny ViT)")
    parser.add_argument("--expansions", default="0,32,72,128", help="0 is the dense baseline")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)

    if args.one is not None:  # child: measure one configuration, print JSON
        print(json.dumps(measure(args.arch, args.one, args.batch, args.steps, args.warmup, args.device)))
        return {}

    rows = []
    for expansion in (int(e) for e in args.expansions.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--one", str(expansion),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device] + (["--arch", args.arch] if args.arch else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"expansion": expansion, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(_line(rows[-1]), flush=True)
    dense = next((r for r in rows if r.get("expansion") == 0 and "error" not in r), None)
    for row in rows:
        if dense and "error" not in row:
            row["throughput_vs_dense"] = row["samples_per_s"] / dense["samples_per_s"]
            row["memory_vs_dense"] = row["peak_memory_mib"] / dense["peak_memory_mib"]
    result = {"arch": args.arch or "embedded-tiny", "device": args.device, "host": platform.node(),
              "python": platform.python_version(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train_throughput_{args.device}_{args.arch or 'tiny'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _line(row: dict) -> str:
    if "error" in row:
        return f"expansion {row['expansion']:>4}: failed: {row['error']}"
    return (f"expansion {row['expansion']:>4}  width {row['width']:>6}  {row['samples_per_s']:8.1f} samples/s  "
            f"{row['step_ms']:8.1f} ms/step  peak {row['peak_memory_mib']:8.1f} MiB  {row['parameters_m']:.2f}M params")


if __name__ == "__main__":
    main()
