"""The metrics stage's computations at scale, on a synthetic sparse activation store.

The paper's ViT-L/14 Sparse+ store is 1.2M images x 55,296 features at L0 ~ 400 (480M non-zeros,
~3.9 GB as float32 CSR). This benchmark makes stores of the same width and density with fewer rows
(and a width sweep at fixed rows), runs the *pipeline's own* metric functions on them exactly as
``pipeline/metrics/evaluate.py`` and ``pipeline/atlas/build.py`` call them, and fits how time and
memory grow with rows and with width (log-log slope), to extrapolate to 1.2M x 55,296.

Synthetic data (seeded): each row's features are drawn from a Zipf-like frequency law
(p_f ~ (rank + 50)^-1.1 over the live features; 5% of features are dead) with replacement and
deduplicated, values log-normal and positive (float32), so the realised L0 sits a little under the
target and is reported. Alongside: a dense (n x 768) float32 reference embedding for Clarity, a
text store of the same shape for modality, and a dense [C x F] class-embedding matrix (C = 1000,
ImageNet's) with random labels for zero-shot.

Measurement: each size is generated in one subprocess (written to a .npy cache) and measured in
a fresh one that loads it and runs the metrics one after the other; before each metric it collects
garbage and resets its resident-set high-water mark (``/proc/self/clear_refs``, "5"). ``peak_extra_gib`` is the high-water mark (VmHWM) during the call minus the resident set
just before it: the memory the metric needed on top of its inputs. ``peak_rss_gib`` is the
high-water mark itself (inputs + metric + the interpreter with numpy, scipy, pyarrow and torch).
glibc is told to mmap every allocation over 128 KiB, so freed arrays leave the resident set and
the mark is not inflated by heap fragmentation. Time is the call's wall clock (one call).

    python -m benchmarks.metrics_scale                       # rows 10k,20k,40k; widths 13,824..55,296 at 20k
    python -m benchmarks.metrics_scale --rows 20000 --widths 1024 --sweep-rows 2000,4000 --tag tiny
    python -m benchmarks.metrics_scale --threads 1,2 --rows 40000 --widths 55296 --sweep-rows 40000 --tag threads

With ``--threads 1,N`` every size is measured once per thread count (``metrics.threads``: the
row blocks of Clarity, zero-shot and top-k on N threads), side by side in the same run on the same
inputs; the growth fits use the first count, and ``speedup`` is its wall time over each other's.

Writes ``benchmarks/results/metrics_scale_cpu[_<tag>].json``; with ``--compare OTHER.json`` the
table also shows OTHER's numbers (e.g. the run before a fix) next to these.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.child import DOES_NOT_FIT, run_child
from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TARGET = {"rows": 1_200_000, "width": 55_296, "l0": 400}
REFERENCE_DIM = 768
METRICS = ("sparsity", "clarity", "clarity_baseline", "modality", "feature_density", "zeroshot",
           "images_topk", "labels_topk", "atlas_top_images")


# --------------------------------------------------------------------------- synthetic data


def synthetic_store(rows: int, width: int, l0: float, seed: int, dead: float = 0.05,
                    alpha: float = 1.1, offset: float = 50.0):
    """(rows x width) canonical float32 CSR with Zipf-like feature frequencies, mean L0 ~ ``l0``."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    live = width - int(dead * width)
    weights = (np.arange(live) + offset) ** -alpha
    cdf = np.cumsum(weights / weights.sum())
    features = rng.permutation(width)[:live]  # which features are live, in frequency order
    per_row = rng.poisson(l0, size=rows)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), per_row)
    feature = features[np.minimum(np.searchsorted(cdf, rng.random(row_of.size)), live - 1)]
    keys = np.unique(row_of * width + feature)  # sorted and deduplicated: canonical CSR order
    del row_of, feature
    row_of = keys // width
    indices = (keys - row_of * width).astype(np.int32)
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=indptr[1:])
    del keys, row_of
    data = rng.lognormal(0.0, 1.0, size=indices.size).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(rows, width))


def generate(cache: Path, rows: int, width: int, l0: float, classes: int, seed: int = 0) -> dict:
    """Write the inputs of one size to ``cache`` as .npy files; returns their description."""
    cache.mkdir(parents=True, exist_ok=True)
    for name, offset in (("images", 0), ("texts", 1)):
        store = synthetic_store(rows, width, l0, seed + offset)
        for part in ("data", "indices", "indptr"):
            np.save(cache / f"{name}_{part}.npy", getattr(store, part))
        if name == "images":
            nnz = int(store.nnz)
        del store
    rng = np.random.default_rng(seed + 2)
    np.save(cache / "reference.npy", rng.standard_normal((rows, REFERENCE_DIM), dtype=np.float32))
    classifier = rng.random((classes, width)) * (rng.random((classes, width)) < 0.05)
    classifier /= np.maximum(np.linalg.norm(classifier, axis=1, keepdims=True), 1e-12)
    np.save(cache / "classifier.npy", classifier)
    np.save(cache / "labels.npy", rng.integers(0, classes, size=rows))
    return {"rows": rows, "width": width, "nnz": nnz, "l0": nnz / rows, "classes": classes,
            "store_gib": nnz * 8 / 2**30}


def load(cache: Path, width: int) -> dict:
    import scipy.sparse as sp

    def store(name):
        data, indices, indptr = (np.load(cache / f"{name}_{p}.npy") for p in ("data", "indices", "indptr"))
        return sp.csr_matrix((data, indices, indptr), shape=(indptr.size - 1, width))

    return {"images": store("images"), "texts": store("texts"), "reference": np.load(cache / "reference.npy"),
            "classifier": np.load(cache / "classifier.npy"), "labels": np.load(cache / "labels.npy")}


# --------------------------------------------------------------------------- the metrics


def run_metric(name: str, d: dict, top_images: int = 8):
    """One metric computation through the registry the metrics stage computes from
    (:mod:`pipeline.metrics.registry`), with the stage's default parameters (tau, n_min, top-k
    cuts), or the atlas's top images per feature as ``pipeline/atlas/build.py`` calls it."""
    from pipeline.atlas.naming import top_per_feature
    from pipeline.config import MetricsParams
    from pipeline.metrics import modality_summary
    from pipeline.metrics.registry import Activations, compute

    if name == "atlas_top_images":  # name_features(): each feature's top images
        rows, _ = top_per_feature(d["images"], top_images)
        return {"features_with_images": int((rows[:, 0] >= 0).sum())}
    if name == "clarity_baseline":  # part of the registry's clarity; timed alone for the fits
        from pipeline.metrics import dataset_baseline

        return {"baseline": dataset_baseline(d["reference"])}
    x = Activations(d["images"], d["texts"], d["reference"], d["classifier"], d["labels"])
    value = compute(name, x, MetricsParams())
    if name == "modality":
        return modality_summary(value)
    if name == "feature_density":
        return {"mean_density": float(value.mean())}
    if name in ("labels_topk", "images_topk"):
        return {f"top1_at_{k}": acc for k, acc in value.items()}
    return value


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _cpu() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name: str, d: dict) -> dict:
    """Time and peak memory of one metric on loaded inputs ``d``: the resident-set high-water mark
    is reset to the current resident set first, so the peak is this metric's alone."""
    gc.collect()
    before = _rss()
    with open("/proc/self/clear_refs", "w") as refs:  # reset VmHWM to the current resident set
        refs.write("5")
    start, cpu = time.perf_counter(), _cpu()
    value = run_metric(name, d)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu() - cpu
    peak = _hwm()
    return {"metric": name, "status": "ok", "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_extra_gib": max(0, peak - before) / 2**30,
            "peak_rss_gib": peak / 2**30, "inputs_rss_gib": before / 2**30, "value": value}


def measure_size(cache: Path, width: int, metrics, threads: int = 1) -> list[dict]:
    """Every metric on one cached size, one after the other in this process (a fresh subprocess),
    with the metrics' row blocks on ``threads`` threads, as the metrics stage runs them."""
    import pipeline.atlas.naming  # imported before the measured spans, so no import is timed
    import pipeline.metrics.evaluate  # noqa: F401
    from pipeline.metrics._arrays import block_threads

    d = load(cache, width)
    rows = []
    with block_threads(threads):
        for name in metrics:
            try:
                rows.append({**measure(name, d), "threads": threads})
            except MemoryError:
                rows.append({"metric": name, "status": DOES_NOT_FIT, "threads": threads})
    return rows


def run_size(rows: int, width: int, args, scratch: Path) -> list[dict]:
    """Generate one size's inputs (a subprocess), then measure every metric on them in another
    (or in this process with ``--in-process``, for tests)."""
    cache = scratch / f"{rows}x{width}"
    if args.in_process:
        info = generate(cache, rows, width, args.l0, args.classes)
        measured = [row for t in args.threads for row in measure_size(cache, width, args.metrics, t)]
    else:
        gen = [sys.executable, "-m", "benchmarks.metrics_scale", "--generate", str(cache), "--rows", str(rows),
               "--widths", str(width), "--l0", str(args.l0), "--classes", str(args.classes)]
        info = run_child(gen, {"rows": rows, "width": width})
        if info.get("status"):
            return [{**info, "metric": m, "threads": t} for t in args.threads for m in args.metrics]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        measured = []
        for threads in args.threads:
            cmd = [sys.executable, "-m", "benchmarks.metrics_scale", "--one", ",".join(args.metrics),
                   "--generate", str(cache), "--widths", str(width), "--threads", str(threads)]
            done = run_child(cmd, {"status": "none"}, env)
            measured += done["rows"] if "rows" in done else [{**done, "metric": m, "threads": threads}
                                                             for m in args.metrics]
    out = [{**info, **row} for row in measured]
    for row in out:
        print(_line(row), flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- fits


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x): the growth exponent (None: < 2 usable points)."""
    points = [(x, y) for x, y in points if x > 0 and y > 0]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return None
    lx, ly = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def fits(rows: list[dict], width: int, sweep_rows: int, metrics) -> dict:
    """Per metric: growth exponents of time and extra memory in rows (at ``width``) and in width
    (at ``sweep_rows``), and the extrapolation to TARGET along the rows exponent from the largest
    measured size at ``width``."""
    out = {}
    for metric in metrics:
        ok = [r for r in rows if r["metric"] == metric and r["status"] == "ok"]
        by_rows = sorted((r for r in ok if r["width"] == width), key=lambda r: r["rows"])
        by_width = sorted((r for r in ok if r["rows"] == sweep_rows), key=lambda r: r["width"])
        fit = {}
        for key in ("seconds", "cpu_seconds", "peak_extra_gib"):
            fit[f"{key}_vs_rows"] = loglog_slope([(r["rows"], r.get(key, 0)) for r in by_rows])
            fit[f"{key}_vs_width"] = loglog_slope([(r["width"], r.get(key, 0)) for r in by_width])
        if len({r["rows"] for r in by_rows}) >= 2:
            # memory is affine in rows for most metrics (a constant plus so much per row), which a
            # power law fitted where the constant dominates under-states: a straight line as well
            from benchmarks.fit_table import line_fit

            intercept, slope = line_fit([(r["rows"], r["peak_extra_gib"]) for r in by_rows])
            fit["peak_extra_gib_per_million_rows"] = slope * 1e6
            if width == TARGET["width"]:
                fit["extrapolated_peak_extra_gib_linear"] = intercept + slope * TARGET["rows"]
        if by_rows and width == TARGET["width"]:
            last, scale = by_rows[-1], TARGET["rows"] / by_rows[-1]["rows"]
            for key, name in (("seconds", "seconds"), ("cpu_seconds", "cpu_seconds"),
                              ("peak_extra_gib", "peak_extra_gib")):
                slope = fit[f"{key}_vs_rows"]
                fit[f"extrapolated_{name}"] = None if slope is None else last[key] * scale ** slope
        out[metric] = fit
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    args.metrics = [m for m in args.metrics.split(",") if m]
    args.threads = [int(t) for t in str(args.threads).split(",") if t]
    widths = [int(w) for w in args.widths.split(",")]
    if args.table is not None or args.one is not None or args.generate is not None:
        _child_or_table(args, widths)
        return {}

    width = widths[-1]
    sizes = sorted({(args.rows, w) for w in widths} | {(int(n), width) for n in args.sweep_rows.split(",")})
    print(_header(args), flush=True)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metrics_scale_") as scratch:
        for n, w in sizes:
            rows += run_size(n, w, args, Path(scratch))
    result = summarise(rows, args, width, time.perf_counter() - started)
    compare = json.loads(Path(args.compare).read_text()) if args.compare else None
    if compare:
        result["compared_with"] = {"file": Path(args.compare).name, "commit": compare.get("commit")}
    print(table(result, compare))
    out = Path(args.out) if args.out else RESULTS / f"metrics_scale_cpu{'_' + args.tag if args.tag else ''}.json"
    print(f"wrote {write_json(out, result)}")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the width sweep")
    parser.add_argument("--widths", default="13824,27648,55296", help="width sweep (the last: the rows sweep's)")
    parser.add_argument("--sweep-rows", default="10000,20000,40000", help="rows sweep at the largest width")
    parser.add_argument("--l0", type=float, default=400.0)
    parser.add_argument("--classes", type=int, default=1000, help="zero-shot classes (ImageNet: 1000)")
    parser.add_argument("--metrics", default=",".join(METRICS))
    parser.add_argument("--threads", default="1", help="metrics.threads to measure, e.g. 1,2 (side by side)")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    parser.add_argument("--compare", default=None, help="an earlier result JSON to show alongside")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (tests; peaks then share a heap)")
    parser.add_argument("--table", default=None, help="only print the table of this result JSON (with --compare)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)  # child: cache folder
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: metric name
    return parser


def _child_or_table(args, widths: list[int]) -> None:
    """The modes that are not a benchmark run: print a saved result's table, or, as the child
    process of one size, generate its store or measure one metric on it (JSON on stdout)."""
    if args.table is not None:
        print(table(json.loads(Path(args.table).read_text()),
                    json.loads(Path(args.compare).read_text()) if args.compare else None))
    elif args.one is not None:
        print(json.dumps({"rows": measure_size(Path(args.generate), widths[-1], args.one.split(","),
                                               args.threads[0])}))
    else:
        print(json.dumps(generate(Path(args.generate), args.rows, widths[-1], args.l0, args.classes)))


def summarise(rows: list[dict], args, width: int, seconds: float) -> dict:
    """The result file: the measured rows, their growth fits and, at the paper's width, the
    whole pass extrapolated to the target size (a forecast, labelled as one)."""
    result = {
        "benchmark": "metrics_scale",
        "target": TARGET,
        "l0_target": args.l0,
        "classes": args.classes,
        "reference_dim": REFERENCE_DIM,
        "width": width,
        "sweep_rows": args.rows,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "scipy": _scipy_version(), "memory_gib": _memory_gib()},
        "commit": _commit(),
        "measures": "seconds: one call's wall clock; cpu_seconds: its user + system CPU time (all threads; "
                    "less sensitive than wall time to other processes on a shared machine); peak_extra_gib: VmHWM during the call minus RSS before it "
                    "(memory on top of the loaded inputs); peak_rss_gib: VmHWM itself",
        "total_seconds": seconds,
        "threads": args.threads,
        "rows": rows,
        "fits": fits([r for r in rows if r.get("threads", 1) == args.threads[0]], width, args.rows, args.metrics),
        "speedup": speedups(rows, args.threads),
        "extrapolation_note": f"extrapolated to {TARGET['rows']:,} x {TARGET['width']:,} along each metric's fitted "
                              "rows exponent from the largest measured size; a forecast, not a measurement "
                              f"(measured on {os.cpu_count()} cores with the metrics' row blocks on "
                              f"{args.threads[0]} thread(s))",
    }
    if width == TARGET["width"]:
        extrapolated = [f["extrapolated_cpu_seconds"] for f in result["fits"].values()
                        if f.get("extrapolated_cpu_seconds")]
        memory = [max(f["extrapolated_peak_extra_gib"], f.get("extrapolated_peak_extra_gib_linear", 0))
                  for f in result["fits"].values() if f.get("extrapolated_peak_extra_gib")]
        result["extrapolated_total_cpu_seconds"] = sum(extrapolated)
        result["extrapolated_max_peak_extra_gib"] = max(memory, default=None)
        # the loaded inputs at the target: images + texts CSR (8 B per non-zero) and the reference
        nnz = TARGET["rows"] * args.l0
        result["target_inputs_gib"] = (2 * nnz * 8 + TARGET["rows"] * REFERENCE_DIM * 4) / 2**30
    return result


def speedups(rows: list[dict], threads: list[int]) -> dict:
    """Per metric and size: wall seconds on ``threads[0]`` threads over those on each other count."""
    wall = {(r["metric"], r["rows"], r["width"], r.get("threads", 1)): r["seconds"]
            for r in rows if r.get("status") == "ok"}
    out: dict = {}
    for (metric, n, w, t), seconds in wall.items():
        base = wall.get((metric, n, w, threads[0]))
        if t != threads[0] and base:
            out.setdefault(metric, {})[f"{n}x{w}@{t}"] = base / seconds
    return out


def table(result: dict, compare: dict | None = None) -> str:
    """Markdown: per metric, time and extra memory at each size, exponents, extrapolation."""
    sizes = sorted({(r["rows"], r["width"]) for r in result["rows"] if "rows" in r}, key=lambda s: (s[1], s[0]))
    old = {(r["metric"], r.get("rows"), r.get("width")): r for r in (compare or {}).get("rows", [])}

    def cell(row, before):
        if row is None or row.get("status") != "ok":
            return row.get("status", "-") if row else "-"
        text = f"{_cpu_or_wall(row):.2f} s / {row['peak_extra_gib']:.2f} GiB"
        if before is not None and before.get("status") == "ok":
            if "cpu_seconds" in before and "cpu_seconds" in row:
                text += f" (before: {before['cpu_seconds']:.2f} s / {before['peak_extra_gib']:.2f} GiB)"
            else:  # wall against wall: the older run has no CPU time
                text += (f" (wall {row['seconds']:.1f} s; before: wall {before['seconds']:.1f} s / "
                         f"{before['peak_extra_gib']:.2f} GiB)")
        return text

    head = ["metric (CPU s / extra GiB)", *[f"{n / 1000:g}k x {w:,}" for n, w in sizes], "exp. rows (cpu / mem)",
            "exp. width (cpu / mem)",
            f"{result['target']['rows'] // 1000}k x {result['target']['width']:,} (extrapolated)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = result.get("threads", [1])[0]
    index = {(r["metric"], r.get("rows"), r.get("width")): r for r in result["rows"] if r.get("threads", 1) == first}
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    for metric, fit in result["fits"].items():
        cells = [cell(index.get((metric, n, w)), old.get((metric, n, w))) for n, w in sizes]
        extra = (f"{fit['extrapolated_cpu_seconds']:.0f} s / {fit['extrapolated_peak_extra_gib']:.1f} GiB"
                 f" (line: {fit.get('extrapolated_peak_extra_gib_linear', float('nan')):.1f} GiB)"
                 if fit.get("extrapolated_cpu_seconds") and fit.get("extrapolated_peak_extra_gib") is not None
                 else "-")
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {fmt(fit['cpu_seconds_vs_rows'])} / "
                     f"{fmt(fit['peak_extra_gib_vs_rows'])} | {fmt(fit['cpu_seconds_vs_width'])} / "
                     f"{fmt(fit['peak_extra_gib_vs_width'])} | {extra} |")
    if result.get("extrapolated_total_cpu_seconds") and result.get("extrapolated_max_peak_extra_gib") is not None:
        lines.append(f"\nwhole pass extrapolated to the target: {result['extrapolated_total_cpu_seconds'] / 60:.1f} "
                     "CPU min "
                     f"single process; largest metric's extra memory "
                     f"{result['extrapolated_max_peak_extra_gib']:.1f} GiB on top of "
                     f"{result['target_inputs_gib']:.1f} GiB of inputs (forecast)")
    for metric, ratios in result.get("speedup", {}).items():
        lines.append(f"{metric}: wall on {first} thread(s) / on more: " +
                     ", ".join(f"{size}: {ratio:.2f}x" for size, ratio in ratios.items()))
    return "\n".join(lines)


def _cpu_or_wall(row: dict) -> float:
    """CPU seconds where measured (older results: wall seconds)."""
    return row.get("cpu_seconds", row["seconds"])


def _header(args) -> str:
    return (f"metrics at scale: L0 ~ {args.l0:g}, {args.classes} classes, reference dim {REFERENCE_DIM}; "
            f"one fresh process per size\n{'rows':>8} {'width':>7} {'metric':>18} {'s':>9} "
            f"{'cpu s':>9} {'extra GiB':>10} {'peak GiB':>9}")


def _line(row: dict) -> str:
    head = f"{row.get('rows', 0):>8} {row.get('width', 0):>7} {row['metric']:>18}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    return (f"{head} {row['seconds']:>9.2f} {row.get('cpu_seconds', float('nan')):>9.2f} "
            f"{row['peak_extra_gib']:>10.3f} {row['peak_rss_gib']:>9.3f}")


def _scipy_version() -> str:
    import scipy

    return scipy.__version__


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or None


if __name__ == "__main__":
    main()
