"""Sampling throughput: the ``sample`` stage on a webdataset source, Ray Data against plain loops.

Builds a synthetic webdataset source once (``--records`` pairs in tars of ``--per-tar``, as
img2dataset writes them: ``key.jpg`` / ``key.txt`` / ``key.json``; ``--pool`` distinct 64 x 64
JPEGs rendered by the embedded generator, cycled, each with its own caption), then measures in the
same run, every path writing the same shards (checked by sha256):

* ``plain_stream``: one process reads each source tar once, front to back, and validates
  (:func:`pipeline.data.records.validate`: the JPEG is decoded), splits
  (:func:`pipeline.data.sampling.split_of`) and writes (:func:`pipeline.data.shards.write_shard`)
  exactly as the stage does: the simplest loop that does the stage's work;
* ``plain_stage``: the stage's own per-shard code (``refs`` + ``plan_shards`` + ``build_shard``)
  called shard after shard in this process, no Ray;
* ``ray``: the stage itself (:func:`pipeline.data.sampling.run_sample`: plan, one Ray Data task
  per shard, eval sets, manifest), at each ``--task-cpus`` on a 2-CPU local cluster (2.0: one
  task at a time, 1.0: two, 0.5: four, the stage's default). Ray's start-up is not counted.

Records/s per core divides by the cores a path can use (1 for the plain loops, min(tasks, cores)
for Ray). The 15M-pair estimate is a linear extrapolation from measured per-core throughput.

    python -m benchmarks.sample_throughput                    # 50k records (--records 100000: ~10 min here)
    python -m benchmarks.sample_throughput --records 20000 --task-cpus 1.0

Writes ``benchmarks/results/sample_throughput_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_PAIRS = 15_000_000
EXTRAPOLATE_CORES = (2, 16, 64)


def build_source(folder: Path, records: int, per_tar: int, pool: int, seed: int = 0) -> dict:
    """Write ``records`` webdataset samples into ``folder/src-NNNNN.tar``; returns sizes."""
    from pipeline.data.generator import render_record
    from pipeline.data.shards import _add_member

    folder.mkdir(parents=True, exist_ok=True)
    rendered = [render_record(i, seed) for i in range(min(pool, records))]
    started = time.perf_counter()
    for start in range(0, records, per_tar):
        with tarfile.open(folder / f"src-{start // per_tar:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_tar, records)):
                rec = rendered[i % len(rendered)]
                key = f"{i:09d}"
                _add_member(tar, f"{key}.jpg", rec.jpeg)
                _add_member(tar, f"{key}.txt", f"{rec.caption} (pair {i})".encode())
                _add_member(tar, f"{key}.json", json.dumps({"key": key, "width": 64, "height": 64}).encode())
    files = sorted(folder.glob("src-*.tar"))
    return {"records": records, "tars": len(files), "per_tar": per_tar, "distinct_images": len(rendered),
            "image_size": 64, "bytes": sum(f.stat().st_size for f in files),
            "build_seconds": time.perf_counter() - started}


def sample_params(source_dir: Path, out_dir: Path, shard_size: int):
    from pipeline.config import SampleParams

    return SampleParams.model_validate({
        "source": {"kind": "webdataset", "path": str(source_dir / "src-*.tar"), "image_key": "jpg",
                   "caption_key": "txt"},
        "shard_size": shard_size, "out_dir": str(out_dir),
    })


def plain_stream(params) -> dict:
    """Read every source tar once, in order; validate, split and write as the stage does."""
    from pipeline.data.records import Record, validate
    from pipeline.data.sampling import ShardPlan, split_of
    from pipeline.data.shards import SPLITS, write_shard
    from pipeline.data.sources import WebDatasetSource, _expand, _split_member

    source = WebDatasetSource(params.source)
    fractions = params.splits.as_dict()
    out_dir = Path(params.out_dir)
    pending: dict[str, list[Record]] = {s: [] for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    written, skipped = 0, 0

    def flush(split: str) -> None:
        nonlocal written
        plan = ShardPlan(split, counts[split], [])
        written += write_shard(pending[split], out_dir / plan.path)
        counts[split] += 1
        pending[split] = []

    def handle(file: str, key: str, parts: dict) -> None:
        nonlocal skipped
        result = validate(source._record(file, key, parts), min_side=params.min_image_side,
                          max_aspect=params.max_aspect_ratio, require_sidecar=params.source.require_sidecar)
        if not isinstance(result, Record):
            skipped += 1
            return
        split = split_of(key, params.seed, fractions)
        pending[split].append(result)
        if len(pending[split]) == params.shard_size:
            flush(split)

    started = time.perf_counter()
    for file in _expand(params.source.path):
        current, parts = None, {}
        with tarfile.open(file) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != current:
                    if current is not None:
                        handle(file, current, parts)
                    current, parts = key, {}
                parts[ext] = tar.extractfile(member).read()
        if current is not None:
            handle(file, current, parts)
    for split in SPLITS:
        if pending[split]:
            flush(split)
    return {"path": "plain_stream", "cores": 1, "written": written, "skipped": skipped,
            "seconds": time.perf_counter() - started}


def plain_stage(params) -> dict:
    """The stage's per-shard code, shard after shard, in this process."""
    from dataclasses import asdict

    from pipeline.data.sampling import build_shard, plan_shards
    from pipeline.data.sources import make_source

    started = time.perf_counter()
    source = make_source(params.source)
    refs = source.refs()
    plans = plan_shards(refs, [source.group(r) for r in refs], params)
    planned = time.perf_counter()
    dumped = params.model_dump(mode="json")
    results = [build_shard(asdict(plan), dumped, params.out_dir) for plan in plans]
    done = time.perf_counter()
    return {"path": "plain_stage", "cores": 1, "written": sum(r["written"] for r in results),
            "skipped": sum(len(r["skipped"]) for r in results), "shards": len(plans),
            "plan_seconds": planned - started, "seconds": done - started}


def ray_stage(params, task_cpus: float, cluster_cpus: int) -> dict:
    """The stage's entry point (``run_sample``) at ``task_cpus`` per Ray Data task."""
    from pipeline.config import RayParams
    from pipeline.data.sampling import run_sample

    tasks = max(1, int(cluster_cpus // task_cpus))
    started = time.perf_counter()
    manifest = run_sample(params, RayParams(num_cpus=cluster_cpus, task_cpus=task_cpus))
    return {"path": "ray", "task_cpus": task_cpus, "tasks": tasks, "cores": min(tasks, cluster_cpus),
            "written": manifest["written"], "skipped": manifest["skipped"], "shards": len(manifest["shards"]),
            "seconds": time.perf_counter() - started}


def shard_hashes(out_dir: Path) -> dict[str, str]:
    from pipeline.io import file_sha256

    return {str(p.relative_to(out_dir)): file_sha256(p) for p in sorted(out_dir.glob("*/shard-*.tar"))}


def ray_worker_module() -> str:
    """Where a Ray worker imports ``pipeline`` from (the worktree or an installed copy)."""
    import ray

    @ray.remote(num_cpus=0.1)
    def where() -> str:
        import pipeline

        return pipeline.__file__

    return ray.get(where.remote())


def finish(run: dict, records: int, reference: dict | None) -> dict:
    run["records_per_s"] = run["written"] / run["seconds"]
    run["records_per_s_per_core"] = run["records_per_s"] / run["cores"]
    if reference is not None:
        run["vs_plain_stream"] = run["records_per_s"] / reference["records_per_s"]
    run["paper_15m_hours"] = {str(n): PAPER_PAIRS / (run["records_per_s_per_core"] * n) / 3600
                              for n in EXTRAPOLATE_CORES}
    return run


def measure(records: int, per_tar: int, pool: int, shard_size: int, task_cpus: list[float],
            cluster_cpus: int = 2, work: Path | None = None) -> dict:
    from pipeline.config import RayParams
    from pipeline.runtime.cluster import connect

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="sample-bench-")) if own else work
    home = os.getcwd()
    os.chdir(work)  # the work folder is the benchmark's project: output folders must lie inside one
    try:
        source = build_source(work / "source", records, per_tar, pool)
        connect(RayParams(num_cpus=cluster_cpus))
        result = {"cores": os.cpu_count(), "ray_cluster_cpus": cluster_cpus, "source": source,
                  "shard_size": shard_size, "worker_imports": ray_worker_module(), "runs": []}
        hashes = {}
        reference = None
        jobs = [("plain_stream", None), ("plain_stage", None)] + [("ray", c) for c in task_cpus]
        for name, cpus in jobs:
            out = work / f"out-{name}-{cpus}"
            params = sample_params(work / "source", out, shard_size)
            if name == "plain_stream":
                run = plain_stream(params)
            elif name == "plain_stage":
                run = plain_stage(params)
            else:
                run = ray_stage(params, cpus, cluster_cpus)
            run = finish(run, records, reference)
            reference = reference or run
            hashes[f"{name}-{cpus}"] = shard_hashes(out)
            shutil.rmtree(out, ignore_errors=True)
            result["runs"].append(run)
            print(f"measured {name} {cpus or ''}: {run['written']} records in {run['seconds']:.1f} s", flush=True)
        first = next(iter(hashes.values()))
        result["same_shards"] = all(h == first for h in hashes.values())
        return result
    finally:
        os.chdir(home)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000,
                        help="source size (100k: 4m41s for the whole benchmark on 2 quiet cores)")
    parser.add_argument("--per-tar", type=int, default=10_000, help="records per source tar (img2dataset: 10,000)")
    parser.add_argument("--pool", type=int, default=1000, help="distinct images rendered, then cycled")
    parser.add_argument("--shard-size", type=int, default=1000, help="sample.shard_size (params.yaml: 1000)")
    parser.add_argument("--task-cpus", type=float, action="append",
                        help="ray.task_cpus per run on a 2-CPU cluster (default 2.0, 1.0, 0.5: 1, 2, 4 tasks)")
    parser.add_argument("--out", default=str(RESULTS / "sample_throughput_cpu.json"))
    args = parser.parse_args(argv)

    result = measure(args.records, args.per_tar, args.pool, args.shard_size, args.task_cpus or [2.0, 1.0, 0.5])
    src = result["source"]
    print(f"{src['records']} records in {src['tars']} tars of {src['per_tar']} ({src['bytes'] / 2**20:.0f} MiB), "
          f"shards of {result['shard_size']}, {result['cores']} cores; identical shards: {result['same_shards']}")
    print(f"{'path':<26} {'s':>7} {'rec/s':>8} {'rec/s/core':>11} {'vs plain':>9} "
          + " ".join(f"{'15M on ' + str(n) + ' cores':>16}" for n in EXTRAPOLATE_CORES))
    for run in result["runs"]:
        name = run["path"] if run["path"] != "ray" else f"ray ({run['tasks']} task(s), {run['task_cpus']:g} cpu)"
        print(f"{name:<26} {run['seconds']:>7.1f} {run['records_per_s']:>8.0f} {run['records_per_s_per_core']:>11.0f} "
              f"{run.get('vs_plain_stream', 1.0):>9.2f} "
              + " ".join(f"{run['paper_15m_hours'][str(n)]:>15.2f}h" for n in EXTRAPOLATE_CORES))
    print("15M hours: linear extrapolation from the measured records/s per core")
    print(f"-> {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
