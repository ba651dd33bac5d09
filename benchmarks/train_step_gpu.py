"""A full training step on a GPU: dense CLIP vs Sparse CLIP at x72 and x128, side by side.

ViT-B-32 and ViT-L-14 (open_clip configs, random init, through
:func:`pipeline.clip.model.build_model`), bf16 autocast, AdamW, the project's objective with
either contrastive loss. Every configuration runs the same number of timed steps on the
same synthetic batch in its own subprocess, so its peak (``torch.cuda.max_memory_allocated``)
is its own and an out-of-memory error only marks that row "does not fit".

With ``--global-batch`` above ``--batch`` the step is rank 0's step of a data-parallel job of
``global / batch`` workers: the contrastive loss sees the other workers' embeddings
(:mod:`benchmarks.simulated`), so the peak is what one GPU of that job needs. Making those
blocks is the simulation's cost, not training's: it is timed alone (``generate_ms``) and taken
out of ``net_step_ms``.

    python -m benchmarks.train_step_gpu                               # needs CUDA
    python -m benchmarks.train_step_gpu --archs ViT-L-14 --batch 64 --losses clip,tiled
    python -m benchmarks.train_step_gpu --global-batch 32768 --losses clip,tiled --expansions 72,128,256
    python -m benchmarks.train_step_gpu --cpu-smoke                   # tiny model, 2 steps

Results go to ``benchmarks/results/train_step_gpu[_global<N>].json``; a ``--cpu-smoke`` run
only checks that the script works and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks.child import DOES_NOT_FIT, run_child

RESULTS = Path(__file__).resolve().parent / "results"
TINY = "tiny"  # --cpu-smoke: the embedded inline ViT of ModelParams


def measure(arch: str, expansion: int, loss: str, args) -> dict:
    """Time ``args.steps`` optimiser steps of one configuration (inside a subprocess)."""
    import torch

    from benchmarks.simulated import SimulatedContrastive, generation_ms, other_blocks
    from pipeline.clip.loss import SparseClipObjective
    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import make_optimizer
    from pipeline.config import ModelParams, OptimParams

    cuda = args.device == "cuda"
    workers = args.global_batch // args.batch
    params = ModelParams(
        arch=None if arch == TINY else arch,
        expansion=expansion,
        activation="none" if expansion == 0 else "relu",
        logit_scale_cap=50,
    )
    row = {"arch": arch, "expansion": expansion, "loss": loss, "batch": args.batch, "workers": workers}
    try:
        model = build_model(params).to(args.device)
        objective = SparseClipObjective(params, loss=loss)
        if workers > 1:
            objective.contrastive = SimulatedContrastive(loss, workers, args.density)
        optimizer = make_optimizer(model, OptimParams(lr=1e-4))
        size, length = model.image_size, model.context_length
        images = torch.randn(args.batch, 3, size, size, device=args.device)
        texts = torch.randint(1, 49000, (args.batch, length), device=args.device)
        autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda)

        def step() -> torch.Tensor:
            with autocast:
                outputs = model(images, texts)
                loss_value = objective(outputs)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss_value.backward()
            optimizer.step()
            model.clamp_logit_scale_()
            return outputs

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            outputs = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        features = outputs["image_features"]
        generate_ms = generation_ms(other_blocks(workers, args.batch, model.width, args.density,
                                                 args.device, features.dtype), args.device)
    except torch.OutOfMemoryError:
        return {**row, "status": DOES_NOT_FIT}
    step_ms = 1000 * elapsed / args.steps
    net_step_ms = step_ms - generate_ms * (1 if loss == "clip" else 2)
    return {
        **row,
        "status": "ok",
        "width": model.width,
        "feature_dtype": str(features.dtype).removeprefix("torch."),
        "samples_per_s": args.batch * 1000 / net_step_ms,
        "step_ms": step_ms,
        "generate_ms": generate_ms,
        "net_step_ms": net_step_ms,
        "peak_memory_gib": peak,
        "image_l0": (outputs["image_raw"] != 0).float().sum(-1).mean().item(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_config(arch: str, expansion: int, loss: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step_gpu", "--one"]
    cmd += [f"{arch}:{expansion}:{loss}", "--device", args.device]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--global-batch", str(args.global_batch)]
    cmd += ["--density", str(args.density)]
    return run_child(cmd, {"arch": arch, "expansion": expansion, "loss": loss, "batch": args.batch})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--expansions", default="0,72,128", help="0: dense baseline")
    parser.add_argument("--losses", default="clip", help="clip, tiled or clip,tiled")
    parser.add_argument("--batch", type=int, default=128, help="local batch of the GPU")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="simulated global batch (default: --batch, a single worker)")
    parser.add_argument("--density", type=float, default=0.01,
                        help="non-zero fraction of the other workers' embeddings")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every configuration, interleaved; rows keep the median run")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model, 2 steps, CPU"
    )
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # arch:x:loss
    args = parser.parse_args(argv)

    if args.global_batch is None:
        args.global_batch = args.batch
    if args.global_batch % args.batch:
        parser.error("--global-batch must be a multiple of --batch")
    if args.one is not None:  # child: measure one configuration, print JSON
        arch, expansion, loss = args.one.split(":")
        print(json.dumps(measure(arch, int(expansion), loss, args)))
        return {}
    if args.cpu_smoke:
        args.archs, args.device, args.steps, args.warmup = TINY, "cpu", 2, 1
        args.global_batch = args.global_batch // args.batch * 8
        args.batch = 8
    elif not _cuda_available():
        sys.exit(
            "train_step_gpu needs a CUDA GPU (ViT-L-14 at x128 does not train on a CPU); "
            "run with --cpu-smoke to check the script on a tiny model"
        )

    configs = [(arch, int(expansion), loss) for arch in args.archs.split(",")
               for expansion in args.expansions.split(",") for loss in args.losses.split(",")]
    runs: dict[tuple, list[dict]] = {config: [] for config in configs}
    for round_ in range(args.repeats):  # round-robin: drift in clocks or load hits every config alike
        for config in configs:
            runs[config].append(run_config(*config, args))
            print(f"[{round_ + 1}/{args.repeats}] " + _line(runs[config][-1]), flush=True)
    rows = [_median_run(runs[config]) for config in configs]
    _add_ratios(rows)
    result = {
        **{k: getattr(args, k) for k in ("device", "batch", "global_batch", "density", "steps", "warmup",
                                         "repeats")},
        "gpu": _gpu_name(),
        "host": platform.node(),
        "python": platform.python_version(),
        "rows": rows,
    }
    if args.cpu_smoke:
        print("cpu smoke run: nothing written")
        return result
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_global{args.global_batch}" if args.global_batch > args.batch else ""
    out = RESULTS / f"train_step_gpu{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, every run's throughput beside it, and how many runs
    failed (a configuration that fits only sometimes must not pass for one that fits)."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["samples_per_s"])
    failed = {"failed_runs": len(runs) - len(ok)}
    if not ok:
        return {**runs[0], **failed}
    return {**ok[(len(ok) - 1) // 2], "samples_per_s_runs": [r["samples_per_s"] for r in ok], **failed}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _add_ratios(rows: list[dict]) -> None:
    """Each sparse row against the dense row of the same architecture and loss."""
    dense = {
        (r["arch"], r["loss"]): r
        for r in rows
        if r["expansion"] == 0 and r["status"] == "ok"
    }
    for row in rows:
        ref = dense.get((row["arch"], row["loss"]))
        if ref is None or row["status"] != "ok":
            continue
        row["throughput_vs_dense"] = row["samples_per_s"] / ref["samples_per_s"]
        if ref["peak_memory_gib"]:
            row["memory_vs_dense"] = row["peak_memory_gib"] / ref["peak_memory_gib"]


def _line(row: dict) -> str:
    head = f"{row['arch']:>9} x{row['expansion']:<4} {row['loss']:>6}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    memory = row["peak_memory_gib"]
    memory = f"peak {memory:6.2f} GiB" if memory is not None else "peak n/a (CPU)"
    return (
        f"{head}  width {row['width']:>6}  {row['samples_per_s']:8.1f} samples/s  "
        f"{row['net_step_ms']:8.1f} ms/step  {memory}  L0 {row['image_l0']:7.1f}  "
        f"{row['parameters_m']:.1f}M params"
    )


if __name__ == "__main__":
    main()
