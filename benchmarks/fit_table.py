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
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# what torch reports as total memory on each card (GiB); 1 GiB is kept for the CUDA context
GPUS = {"40 GB (A100)": 39.6, "80 GB (A100, H100)": 79.6, "141 GB (H200)": 140.4}
CONTEXT_GIB = 1.0


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of peak GiB against expansion."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def largest_expansion(points: list[tuple[int, float]], failed: list[int], memory_gib: float) -> str:
    """The largest expansion that fits ``memory_gib``; a forecast beyond 4x the largest measured
    expansion is not given (other terms would matter there)."""
    intercept, slope = line_fit(points)
    if intercept + CONTEXT_GIB > memory_gib:
        return "none (the dense step alone is larger)"
    limit = min([int((memory_gib - CONTEXT_GIB - intercept) / slope), *(e - 1 for e in failed)])
    measured = [e for e, _ in points]
    if limit > 4 * max(measured):
        return f"> x{4 * max(measured)} (forecast)"
    return f"x{limit}" + ("" if min(measured) <= limit <= max(measured) else " (forecast)")


def table(result: dict) -> str:
    rows = result["rows"]
    head = ["architecture", "loss", "measured peaks (GiB)", *GPUS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for loss in dict.fromkeys(r["loss"] for r in rows):
            mine = [r for r in rows if r["arch"] == arch and r["loss"] == loss and r["expansion"] > 0]
            points = [(r["expansion"], r["peak_memory_gib"]) for r in mine if r["status"] == "ok"]
            failed = [r["expansion"] for r in mine if r["status"] != "ok"]
            if len(points) < 2:
                continue
            peaks = ", ".join([f"x{e}: {p:.1f}" for e, p in points] + [f"x{e}: does not fit" for e in failed])
            cells = [largest_expansion(points, failed, memory) for memory in GPUS.values()]
            lines.append(f"| {arch} | {loss} | {peaks} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RESULTS / "train_step_gpu_global32768.json"
    result = json.loads(path.read_text())
    text = (f"Largest expansion per GPU: rank 0 of a {result['global_batch']:,} global batch, local batch "
            f"{result['batch']}, bf16 autocast, AdamW, no gradient checkpointing ({path.name}, "
            f"{result.get('gpu')}); a forecast lies outside the measured expansions, on the line through them\n\n"
            + table(result))
    print(text)
    return text


if __name__ == "__main__":
    main()
