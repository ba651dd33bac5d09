"""Stage start-up: a cold ``python -m stages <stage>`` against one forked from the warm stage server.

What the server removes is each stage's imports, so this times exactly that: ``python -m stages
<stage> --help`` (imports the stage module, prints its usage, exits; no work, no Ray, no MLflow),
cold (a fresh interpreter) and warm (the client hands it to a server that imported every stage
once), alternating, ``--repeats`` times each; the median of each, their ratio, and the sum over the
stages of the embedded run (each stage counted as often as ``dvc.yaml`` runs it).

    python -m benchmarks.stage_startup                 # every stage, 3 repeats

Writes ``benchmarks/results/stage_startup_cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.io import write_json
from pipeline.runtime.stage_server import SERVER_ENV, warm_stage_server
from stages import STAGES

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
RUNS_PER_PIPELINE = {"train": 3, "extract": 3, "metrics": 3}  # foreach over train.variants; ablation: not in dvc.yaml


def time_help(stage: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages", stage, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "usage:" not in proc.stdout or "cold" in proc.stderr:
        raise RuntimeError(f"{stage}: {proc.stderr[-1000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "stage_startup_cpu.json"))
    args = parser.parse_args(argv)
    cold_env = {k: v for k, v in os.environ.items() if k != SERVER_ENV}
    with tempfile.TemporaryDirectory(prefix="warm-") as folder, warm_stage_server(folder, {}, "stages") as warm:
        warm_env = {**cold_env, **warm}
        started = time.perf_counter()
        while not Path(warm[SERVER_ENV]).exists():
            time.sleep(0.1)
        server_ready_s = time.perf_counter() - started
        times = {stage: {"cold": [], "warm": []} for stage in STAGES}
        for _ in range(args.repeats):
            for stage in STAGES:
                times[stage]["cold"].append(time_help(stage, cold_env))
                times[stage]["warm"].append(time_help(stage, warm_env))
    per_stage = {stage: {"cold_s": statistics.median(t["cold"]), "warm_s": statistics.median(t["warm"]),
                         "cold_over_warm": statistics.median(t["cold"]) / statistics.median(t["warm"])}
                 for stage, t in times.items()}
    in_pipeline = [s for s in STAGES if s != "ablation"]
    total = {kind: sum(per_stage[s][f"{kind}_s"] * RUNS_PER_PIPELINE.get(s, 1) for s in in_pipeline)
             for kind in ("cold", "warm")}
    result = {"what": "python -m stages <stage> --help, cold vs forked from the warm stage server (median)",
              "cpus": os.cpu_count(), "repeats": args.repeats, "server_ready_s": server_ready_s,
              "stages": per_stage, "embedded_run_total_s": total,
              "embedded_run_saved_s": total["cold"] - total["warm"]}
    write_json(Path(args.out), result)
    for stage, row in per_stage.items():
        print(f"{stage:10s} cold {row['cold_s']:5.2f} s  warm {row['warm_s']:5.2f} s  {row['cold_over_warm']:5.1f}x")
    print(f"embedded run ({len(in_pipeline)} stage kinds, 17 stage runs): cold {total['cold']:.0f} s, warm "
          f"{total['warm']:.0f} s of start-up; server ready after {server_ready_s:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
