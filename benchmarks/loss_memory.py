"""The contrastive loss alone: open_clip's ClipLoss vs TiledClipLoss at a simulated global batch.

One process plays rank 0 of ``global_batch / local_batch`` workers, the other workers'
embeddings fed in (:mod:`benchmarks.simulated`): ``clip`` is open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)`` with its all_gather replaced by a
concatenation, ``tiled`` is TiledClipLoss's own computation with the blocks made one at a time.
Both see the same seeded blocks (``--density`` non-zero), so their values are printed side by
side. Forward + backward; peak memory is the rise above what was allocated before the
step: ``torch.cuda.max_memory_allocated`` on CUDA, the child's peak resident set on CPU
(each configuration runs in its own subprocess, with glibc told to mmap every allocation
over 128 KiB so that freed tensors leave the resident set). A configuration that runs out of memory
is recorded as "does not fit".

    python -m benchmarks.loss_memory --small            # CPU: global 1024, width 64 x {32,72,128}
    python -m benchmarks.loss_memory --device cuda      # global 32768, width 768 x {32,72,128,256}

On CUDA both losses run under bf16 autocast by default, as training does (``--precision
fp32`` for the fp32 comparison). Results go to
``benchmarks/results/loss_memory_<device>_<small|full>[_bf16].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from benchmarks.child import DOES_NOT_FIT, run_child

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = {
    "global_batch": 1024,
    "local_batch": 128,
    "base": 64,
    "expansions": "32,72,128",
}
FULL = {
    "global_batch": 32768,
    "local_batch": 256,
    "base": 768,
    "expansions": "32,72,128,256",
}


def measure(loss: str, width: int, args) -> dict:
    """Peak memory and time of one forward + backward (run inside a fresh subprocess)."""
    import torch

    from benchmarks.simulated import generation_ms, loss_fn, make_block, other_blocks

    workers = args.global_batch // args.local_batch
    others = other_blocks(workers, args.local_batch, width, args.density, args.device)
    image, text = (t.requires_grad_() for t in make_block(0, args.local_batch, width, args.density, args.device))
    scale = torch.tensor(50.0, device=args.device, requires_grad=True)
    contrastive = loss_fn(loss)

    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> float:
        image.grad = text.grad = scale.grad = None
        with autocast:
            value = contrastive(image, text, scale, others, workers)
        value.backward()
        return value.item()

    row = {"loss": loss, "width": width, "workers": workers}
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    try:
        before = _reset_peak(args.device)
        value = step()
        sync()
        row["peak_memory_mib"] = max(0, _peak(args.device) - before) / 2**20
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        sync()
        row["ms"] = 1000 * (time.perf_counter() - start) / args.repeats
    except (torch.OutOfMemoryError, MemoryError):
        return {**row, "status": DOES_NOT_FIT}
    except RuntimeError as error:  # the CPU allocator's "can't allocate memory"
        if "allocate" not in str(error):
            raise
        return {**row, "status": DOES_NOT_FIT}
    row["value"] = value
    # making the blocks is the simulation's cost, not the loss's: clip makes them once
    # (its gather), tiled twice (forward and backward); net_ms takes that out
    row["generate_ms"] = generation_ms(others, args.device)
    row["net_ms"] = row["ms"] - row["generate_ms"] * (1 if loss == "clip" else 2)
    return {**row, "status": "ok"}


def _reset_peak(device: str) -> int:
    """Bytes in use now; on CUDA also restart the peak counter."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_config(loss: str, width: int, args) -> dict:
    """One configuration in a fresh process: its own peak, and an OOM kills only it."""
    cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--one", f"{loss}:{width}"]
    for key in ("global_batch", "local_batch", "density", "repeats", "device", "precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    # glibc keeps freed heap memory resident, so the peak RSS would count fragmentation;
    # serving every allocation over 128 KiB with mmap makes frees return memory at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    return run_child(cmd, {"loss": loss, "width": width}, env)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU preset: " + str(SMALL))
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--local-batch", type=int, default=None)
    parser.add_argument("--base", type=int, default=None, help="embed_dim (width = base x e)")
    parser.add_argument("--expansions", default=None)
    parser.add_argument("--losses", default="clip,tiled")
    parser.add_argument("--density", type=float, default=0.01, help="non-zero fraction")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="bf16: both losses under bf16 autocast, as training runs on GPU "
                             "(default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: loss:width
    return parser


def _with_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Options not given take the preset's value (SMALL on CPU, FULL for the paper's shapes)."""
    for key, value in (SMALL if args.small else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cpu" if args.small else _default_device()
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return args


def main(argv=None) -> dict:
    parser = _parser()
    args = _with_preset(parser.parse_args(argv))
    if args.one is not None:
        loss, width = args.one.split(":")
        print(json.dumps(measure(loss, int(width), args)))
        return {}
    if args.global_batch % args.local_batch:
        parser.error("--global-batch must be a multiple of --local-batch")

    rows = []
    print(_header(args), flush=True)
    for expansion in (int(e) for e in args.expansions.split(",")):
        for loss in args.losses.split(","):
            rows.append(
                {"expansion": expansion, **run_config(loss, args.base * expansion, args)}
            )
            print(_line(rows[-1]), flush=True)
    _add_ratios(rows)
    result = {
        "device": args.device,
        "preset": "small" if args.small else "full",
        **{
            k: getattr(args, k)
            for k in ("global_batch", "local_batch", "base", "density", "precision")
        },
        "repeats": args.repeats,
        "host": platform.node(),
        "gpu": _gpu(args.device),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    precision = "" if args.precision == "fp32" else f"_{args.precision}"
    out = RESULTS / f"loss_memory_{args.device}_{result['preset']}{precision}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _gpu(device: str) -> dict | None:
    """The GPU's name and memory: what "does not fit" is relative to."""
    import torch

    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}


def _torch_version() -> str:
    import torch

    return torch.__version__


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_ratios(rows: list[dict]) -> None:
    """Tiled vs ClipLoss at the same width: memory and time ratios, loss difference."""
    clip = {r["width"]: r for r in rows if r["loss"] == "clip" and r["status"] == "ok"}
    for row in rows:
        ref = clip.get(row["width"])
        if row["loss"] == "tiled" and row["status"] == "ok" and ref:
            row["memory_vs_clip"] = row["peak_memory_mib"] / max(
                ref["peak_memory_mib"], 1e-9
            )
            row["time_vs_clip"] = row["net_ms"] / ref["net_ms"]
            row["value_diff"] = abs(row["value"] - ref["value"])


def _header(args) -> str:
    return (
        f"loss fwd+bwd on {args.device}: global batch {args.global_batch} "
        f"({args.global_batch // args.local_batch} workers x {args.local_batch}), "
        f"density {args.density}, {args.precision}\n"
        f"{'x':>4} {'width':>7} {'loss':>6} {'peak MiB':>10} {'ms':>9} "
        f"{'gen ms':>8} {'net ms':>9} {'value':>9}"
    )


def _line(row: dict) -> str:
    head = f"{row['expansion']:>4} {row['width']:>7} {row['loss']:>6}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (
        f"{head} {row['peak_memory_mib']:>10.1f} {row['ms']:>9.1f} "
        f"{row['generate_ms']:>8.1f} {row['net_ms']:>9.1f} {row['value']:>9.4f}"
    )


if __name__ == "__main__":
    main()
