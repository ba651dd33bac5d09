"""A full training step on a GPU: dense CLIP vs Sparse CLIP at x72 and x128, side by side.

ViT-B-32 and ViT-L-14 (open_clip configs, random init, through
:func:`pipeline.model.build_model`), bf16 autocast, AdamW, the project's objective with
either contrastive loss. Every configuration runs the same number of timed steps on the
same synthetic batch in its own subprocess, so its peak (``torch.cuda.max_memory_allocated``)
is its own and an out-of-memory error only marks that row "does not fit".

    python -m benchmarks.train_step_gpu                               # needs CUDA
    python -m benchmarks.train_step_gpu --archs ViT-L-14 --batch 64 --losses clip,tiled
    python -m benchmarks.train_step_gpu --cpu-smoke                   # tiny model, 2 steps

Results go to ``benchmarks/results/train_step_gpu.json``; a ``--cpu-smoke`` run only checks
that the script works and writes nothing.
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

    from pipeline.config import ModelParams
    from pipeline.loss import SparseClipObjective
    from pipeline.model import build_model
    from pipeline.train import param_groups

    cuda = args.device == "cuda"
    params = ModelParams(
        arch=None if arch == TINY else arch,
        expansion=expansion,
        activation="none" if expansion == 0 else "relu",
        logit_scale_cap=50,
    )
    row = {"arch": arch, "expansion": expansion, "loss": loss, "batch": args.batch}
    try:
        model = build_model(params).to(args.device)
        objective = SparseClipObjective(params, loss=loss)
        optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
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
            return outputs["image_raw"]

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            image_raw = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {**row, "status": DOES_NOT_FIT}
    return {
        **row,
        "status": "ok",
        "width": model.width,
        "samples_per_s": args.batch * args.steps / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "image_l0": (image_raw != 0).float().sum(-1).mean().item(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_config(arch: str, expansion: int, loss: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step_gpu", "--one"]
    cmd += [f"{arch}:{expansion}:{loss}", "--device", args.device]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    return run_child(cmd, {"arch": arch, "expansion": expansion, "loss": loss, "batch": args.batch})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--expansions", default="0,72,128", help="0: dense baseline")
    parser.add_argument("--losses", default="clip", help="clip, tiled or clip,tiled")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model, 2 steps, CPU"
    )
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # arch:x:loss
    args = parser.parse_args(argv)

    if args.one is not None:  # child: measure one configuration, print JSON
        arch, expansion, loss = args.one.split(":")
        print(json.dumps(measure(arch, int(expansion), loss, args)))
        return {}
    if args.cpu_smoke:
        args.archs, args.device, args.batch, args.steps, args.warmup = (
            TINY,
            "cpu",
            8,
            2,
            1,
        )
    elif not _cuda_available():
        sys.exit(
            "train_step_gpu needs a CUDA GPU (ViT-L-14 at x128 does not train on a CPU); "
            "run with --cpu-smoke to check the script on a tiny model"
        )

    rows = []
    for arch in args.archs.split(","):
        for expansion in (int(e) for e in args.expansions.split(",")):
            for loss in args.losses.split(","):
                rows.append(run_config(arch, expansion, loss, args))
                print(_line(rows[-1]), flush=True)
    _add_ratios(rows)
    result = {
        **{k: getattr(args, k) for k in ("device", "batch", "steps", "warmup")},
        "gpu": _gpu_name(),
        "host": platform.node(),
        "python": platform.python_version(),
        "rows": rows,
    }
    if args.cpu_smoke:
        print("cpu smoke run: nothing written")
        return result
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "train_step_gpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


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
        f"{row['step_ms']:8.1f} ms/step  {memory}  L0 {row['image_l0']:7.1f}  "
        f"{row['parameters_m']:.1f}M params"
    )


if __name__ == "__main__":
    main()
