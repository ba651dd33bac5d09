"""The largest expansion whose training step fits a GPU, read off the simulated-global-batch step.

``train_step_gpu --global-batch N`` measures rank 0's peak memory at a few expansions. The peak
is the model's step (independent of the width) plus the heads and the contrastive loss (linear
in the width), so a straight line through the sparse rows of each (architecture, loss) gives the
expansion at which a GPU of a given size is full. Each answer says whether it lies inside the
measured expansions (interpolated) or beyond them (extrapolated: a forecast, not a measurement).

    python -m benchmarks.fit_table [benchmarks/results/train_step_gpu_global32768.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# total memory as torch reports it (GiB): the H200 measured here, the others from their byte counts
GPUS = {"40 GB (A100)": 39.4, "80 GB (A100, H100)": 79.2, "141 GB (H200)": 139.8}
# kept free: the CUDA context, and the allocator's cached blocks that a peak of
# torch.cuda.max_memory_allocated (what the benchmark records) does not count
MARGIN_GIB = 2.0


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of peak GiB against expansion."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def largest_expansion(points: list[tuple[int, float]], failed: list[int], memory_gib: float,
                      dense_gib: float | None = None) -> str:
    """The largest expansion that fits ``memory_gib``; a forecast beyond 4x the largest measured
    expansion is not given (other terms would matter there). ``dense_gib``: the measured dense
    step, which rules a GPU out when it alone does not fit."""
    usable = memory_gib - MARGIN_GIB
    if dense_gib is not None and dense_gib > usable:
        return f"none (the dense step alone needs {dense_gib:.0f} GiB)"
    intercept, slope = line_fit(points)
    measured = [e for e, _ in points]
    beyond = f"> x{4 * max(measured)} (forecast)"
    if slope <= 0:  # flat within noise: the width costs nothing measurable
        return beyond if not failed else f"x{min(failed) - 1}"
    limit = min([math.floor((usable - intercept) / slope), *(e - 1 for e in failed)])
    if limit < 1:
        return "none"
    if limit > 4 * max(measured):
        return beyond
    return f"x{limit}" + ("" if min(measured) <= limit <= max(measured) else " (forecast)")


def table(result: dict) -> str:
    rows = result["rows"]
    head = ["architecture", "loss", "measured peaks (GiB)", *GPUS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for loss in dict.fromkeys(r["loss"] for r in rows):
            mine = [r for r in rows if r["arch"] == arch and r["loss"] == loss and r["expansion"] > 0]
            dense = [r["peak_memory_gib"] for r in rows if r["arch"] == arch and r["loss"] == loss
                     and r["expansion"] == 0 and r["status"] == "ok"]
            points = [(r["expansion"], r["peak_memory_gib"]) for r in mine if r["status"] == "ok"]
            failed = [r["expansion"] for r in mine if r["status"] != "ok"]
            if len(points) < 2:
                continue
            peaks = ", ".join([f"dense: {d:.1f}" for d in dense] + [f"x{e}: {p:.1f}" for e, p in points] + [f"x{e}: does not fit" for e in failed])
            cells = [largest_expansion(points, failed, memory, dense[0] if dense else None)
                     for memory in GPUS.values()]
            lines.append(f"| {arch} | {loss} | {peaks} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RESULTS / "train_step_gpu_global32768.json"
    result = json.loads(path.read_text())
    text = (f"Largest expansion per GPU: rank 0 of a {result['global_batch']:,} global batch, local batch "
            f"{result['batch']}, bf16 autocast, AdamW, no gradient checkpointing ({path.name}, "
            f"{result.get('gpu')}); {MARGIN_GIB:g} GiB of each card kept free; a forecast lies outside the "
            "measured expansions, on the line through them\n\n"
            + table(result))
    print(text)
    return text


if __name__ == "__main__":
    main()
