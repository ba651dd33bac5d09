"""Extraction throughput: Ray Data's actor pool against a plain single-process loop, side by side.

Both encode the same rows of one model's extraction (its images, captions, vocabulary, prompts,
token grids and evolution snapshots; the crop and labelled-folder sets, which only Ray Data reads,
are left out of both) with the same encoder class (:class:`pipeline.activations.extract.SparseEncoder`)
and batch size. The plain loop reads the shards in this process and calls the encoder on each
batch with every core's threads. Ray Data is timed end to end (``write_sets``: actor start-up,
encoding, Parquet) and in steady state (rows / the span from the first batch an actor starts to the
last it finishes), for each pool size asked.

    python -m benchmarks.extract_throughput                  # models/sparse on data/sample
    python -m benchmarks.extract_throughput --actors 1 --actors 2 --repeats 2

Writes ``benchmarks/results/extract_throughput_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def local_batches(sets, batch_size: int):
    """The input rows of ``sets`` as the encoder's batch dicts, read in this process (no Ray)."""
    from pipeline.activations.inputs import INPUT_COLUMNS
    from pipeline.data.shards import read_shard

    shard_rows: dict[str, list[dict]] = {}

    def rows_of(name, spec):
        if spec.rows is not None:
            return spec.rows
        paths, keys = spec.shard_keys
        out = []
        for path in paths:
            if path not in shard_rows:
                shard_rows[path] = [{"key": r.key, "group": str(r.meta.get("group", r.key)),
                                     "split": Path(path).parent.name, "meta": json.dumps(r.meta), "jpg": r.jpeg}
                                    for r in read_shard(path)]
            out += [row for row in shard_rows[path] if row["key"] in keys]
        return out

    for name, spec in sets.items():
        rows = rows_of(name, spec)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = {c: np.asarray([r.get(c, b"" if c == "jpg" else "") for r in chunk], dtype=object)
                     for c in INPUT_COLUMNS}
            batch.update({"set": np.full(len(chunk), name, dtype=object),
                          "kind": np.full(len(chunk), spec.kind, dtype=object),
                          "checkpoint": np.full(len(chunk), spec.checkpoint, dtype=object)})
            yield batch


def plain_loop(plan, model_dir: Path, batch_size: int, threads: int) -> dict:
    from pipeline.activations.extract import SparseEncoder

    started = time.perf_counter()
    encoder = SparseEncoder(str(model_dir), plan.weights, threads=threads)
    loaded = time.perf_counter()
    rows = sum(encoder(batch).num_rows for batch in local_batches(plan.sets, batch_size))
    done = time.perf_counter()
    return {"rows": rows, "seconds": done - started, "encode_seconds": done - loaded,
            "rows_per_s": rows / (done - started), "steady_rows_per_s": rows / (done - loaded)}


def timed_encoder(log: Path):
    """A SparseEncoder that appends (pid, start, end, rows) of every batch to ``log``. Built in a
    function so that Ray pickles the class by value (the benchmarks folder is not installed)."""
    from pipeline.activations.extract import SparseEncoder

    class TimedEncoder(SparseEncoder):
        def __call__(self, batch):
            start = time.time()
            table = super().__call__(batch)
            with open(log, "a") as out:
                out.write(f"{os.getpid()} {start} {time.time()} {table.num_rows}\n")
            return table

    return TimedEncoder


def ray_run(plan, model_dir: Path, params, actors: int, task_cpus: float, threads: int) -> dict:
    from pipeline.activations.pool import write_sets

    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    log = work / "batches.txt"
    try:
        started = time.time()
        counts = write_sets("bench", plan.sets, work / "out", "bench",
                            {"model_dir": str(model_dir), "weights": plan.weights, "threads": threads},
                            params.model_copy(update={"actors": actors}), task_cpus, actor=timed_encoder(log))
        done = time.time()
        batches = [line.split() for line in log.read_text().splitlines()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first, last = min(float(b[1]) for b in batches), max(float(b[2]) for b in batches)
    rows = sum(counts.values())
    return {"actors": actors, "threads_per_actor": threads, "rows": rows, "seconds": done - started,
            "first_batch_after_s": first - started, "steady_seconds": last - first,
            "rows_per_s": rows / (done - started), "steady_rows_per_s": rows / (last - first)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", default="sparse")
    parser.add_argument("--actors", type=int, action="append", help="pool sizes (default: 1 and 2)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "extract_throughput_cpu.json"))
    args = parser.parse_args(argv)

    from pipeline.activations.extract import extraction_plan
    from pipeline.config import load_params
    from pipeline.runtime.cluster import connect

    params = load_params(args.params)
    model_dir = (Path(params.train.out_dir) / args.variant).resolve()
    data_dir = Path(params.sample.out_dir).resolve()
    plan = extraction_plan(model_dir, data_dir, params.vocab.out_dir, params.extract)
    plan = plan.__class__({k: v for k, v in plan.sets.items() if v.build is None}, plan.weights, plan.words,
                          plan.zero_shot_tasks)
    cores = os.cpu_count() or 1
    connect(params.ray)
    results = {"cores": cores, "model": args.variant, "batch_size": params.extract.batch_size,
               "sets": sorted(plan.sets), "plain": [], "ray": []}
    for _ in range(args.repeats):
        results["plain"].append(plain_loop(plan, model_dir, params.extract.batch_size, threads=cores))
        for actors in args.actors or [1, 2]:
            results["ray"].append(ray_run(plan, model_dir, params.extract, actors, params.ray.task_cpus,
                                          threads=max(1, cores // actors)))
    plain = max(results["plain"], key=lambda r: r["rows_per_s"])
    print(f"{plain['rows']} rows, batch {params.extract.batch_size}, {cores} cores")
    print(f"plain loop: {plain['seconds']:.1f} s ({plain['rows_per_s']:.0f} rows/s; "
          f"{plain['steady_rows_per_s']:.0f} rows/s after loading)")
    for run in results["ray"]:
        run["ratio_end_to_end"] = run["rows_per_s"] / plain["rows_per_s"]
        run["ratio_steady"] = run["steady_rows_per_s"] / plain["steady_rows_per_s"]
        print(f"Ray Data, {run['actors']} actor(s) x {run['threads_per_actor']} thread(s): {run['seconds']:.1f} s, "
              f"first batch at {run['first_batch_after_s']:.1f} s; steady {run['steady_rows_per_s']:.0f} rows/s "
              f"= {run['ratio_steady']:.2f}x the plain loop's (end to end {run['ratio_end_to_end']:.2f}x)")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
