"""Sparse transport measured: dense vs (index, value) block shifts of the tiled loss, on gloo.

The tiled loss (:class:`pipeline.clip.tiled_loss.TiledClipLoss`) moves each worker's embedding block,
``cat(image, text)`` = ``2 x local_b x width``, one hop round a ring per step of its loop; with
``train.sparse_transport_density`` set, a block sparser than that travels as flat int32 indices +
fp32 values (:class:`pipeline.clip.transport.Transport`). This benchmark spawns ``--workers`` gloo
processes on loopback (CPU) and times, at each density, the project's own ``Transport.shift``
dense (``density=None``) and forced sparse (``density=1.0``: every block with a zero goes as
COO), plus ``dist.all_gather`` of the same block (what open_clip's ``ClipLoss`` moves), and
counts the bytes each sends. Times are the slowest rank's, median over ``--repeats``.

A training step of the tiled loss shifts data blocks ``2 (W - 1)`` times (forward, and the
backward's recompute) and gradient blocks ``W`` times; gradient blocks are near dense (a column
block's gradient is non-zero wherever any local row is), so only the data shifts change with the
threshold. The per-step columns are those ``2 (W - 1)`` data shifts.

    python -m benchmarks.sparse_transport                       # 4 workers, block 256 x 55,296
    python -m benchmarks.sparse_transport --batch 16 --width 512 --repeats 2 --out /tmp/t.json

Writes ``benchmarks/results/sparse_transport_gloo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
DENSITIES = (0.5, 0.2, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def sparse_block(rows: int, width: int, density: float, seed: int):
    """A ``rows x width`` fp32 block with exactly ``round(density * numel)`` positive entries."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    numel = rows * width
    nnz = round(density * numel)
    block = torch.zeros(numel)
    block[torch.randperm(numel, generator=gen)[:nnz]] = torch.rand(nnz, generator=gen) + 0.01
    return block.view(rows, width)


def _timed(fn, group_max) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    return group_max(time.perf_counter() - start)


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.clip.transport import Transport

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    nxt, prev = (rank + 1) % world, (rank - 1) % world

    def group_max(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    rows = []
    for density in cfg["densities"]:
        block = sparse_block(2 * cfg["batch"], cfg["width"], density, seed=1000 * rank + int(density * 1e6))
        expected = sparse_block(2 * cfg["batch"], cfg["width"], density, seed=1000 * prev + int(density * 1e6))
        times = {"dense": [], "sparse": [], "all_gather": []}
        sent = {}
        for mode, threshold in (("dense", None), ("sparse", 1.0)):
            for rep in range(cfg["warmup"] + cfg["repeats"]):
                transport = Transport(threshold)
                got = {}
                elapsed = _timed(lambda t=transport, g=got: g.setdefault("x", t.shift(block, nxt, prev, 0)()), group_max)  # noqa: B023
                if rep >= cfg["warmup"]:
                    times[mode].append(elapsed)
                if not torch.equal(got["x"], expected):
                    raise AssertionError(f"rank {rank}: the {mode} shift at density {density} changed the block")
            sent[mode] = dict(transport.stats)
        gathered = [torch.empty_like(block) for _ in range(world)]
        for rep in range(cfg["warmup"] + cfg["repeats"]):
            elapsed = _timed(lambda: dist.all_gather(gathered, block), group_max)  # noqa: B023 (called at once)
            if rep >= cfg["warmup"]:
                times["all_gather"].append(elapsed)
        rows.append({"density": density, "nnz": int(torch.count_nonzero(block)),
                     "dense_bytes": sent["dense"]["bytes_sent"], "sparse_bytes": sent["sparse"]["bytes_sent"],
                     "sparse_blocks": sent["sparse"]["sparse_blocks"],
                     **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                     **{f"{k}_all_s": v for k, v in times.items()}})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def switch_over(rows: list[dict]) -> dict:
    """Where sparse shifts become faster than dense: the highest measured density at which sparse
    wins (every lower one winning too), and a log-log interpolation of the crossing of the
    sparse/dense time ratio through 1 between that grid point and the next denser one."""
    import math

    by_density = sorted(rows, key=lambda r: r["density"])
    fastest = None
    for row in by_density:
        if row["sparse_s"] < row["dense_s"]:
            fastest = row
        else:
            break
    if fastest is None:
        return {"highest_winning_density": None, "interpolated": None}
    denser = [r for r in by_density if r["density"] > fastest["density"]]
    if not denser:
        return {"highest_winning_density": fastest["density"], "interpolated": None}
    lo, hi = fastest, denser[0]
    r_lo, r_hi = math.log(lo["sparse_s"] / lo["dense_s"]), math.log(hi["sparse_s"] / hi["dense_s"])
    x_lo, x_hi = math.log(lo["density"]), math.log(hi["density"])
    crossing = math.exp(x_lo + (0 - r_lo) * (x_hi - x_lo) / (r_hi - r_lo)) if r_hi != r_lo else lo["density"]
    return {"highest_winning_density": lo["density"], "interpolated": crossing}


def run(workers: int, batch: int, width: int, densities, repeats: int, warmup: int = 1) -> dict:
    import torch.multiprocessing as mp

    cfg = {"batch": batch, "width": width, "densities": list(densities), "repeats": repeats, "warmup": warmup}
    with tempfile.TemporaryDirectory(prefix="sparse-transport-") as tmp:
        out = os.path.join(tmp, "rows.json")
        started = time.perf_counter()
        mp.spawn(_worker, args=(workers, _free_port(), cfg, out), nprocs=workers, join=True)
        rows = json.loads(Path(out).read_text())
        seconds = time.perf_counter() - started
    data_shifts = 2 * (workers - 1)
    for row in rows:
        row["sparse_over_dense_time"] = row["sparse_s"] / row["dense_s"]
        row["sparse_over_dense_bytes"] = row["sparse_bytes"] / row["dense_bytes"]
        row["step_data_shifts"] = data_shifts
        row["step_dense_s"] = data_shifts * row["dense_s"]
        row["step_sparse_s"] = data_shifts * row["sparse_s"]
        row["step_dense_bytes"] = data_shifts * row["dense_bytes"]
        row["step_sparse_bytes"] = data_shifts * row["sparse_bytes"]
    return {"backend": "gloo", "device": "cpu", "workers": workers, "cores": os.cpu_count(),
            "local_batch": batch, "width": width, "block_shape": [2 * batch, width], "dtype": "float32",
            "repeats": repeats, "warmup": warmup, "seconds": seconds, "rows": rows,
            "switch_over": switch_over(rows)}


def current_thresholds() -> dict:
    """The ``train.sparse_transport_density`` the project sets, for comparison."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    found = {}
    for name in ("params.yaml", "deploy/params.paper.yaml"):
        path = root / name
        if path.is_file():
            found[name] = (yaml.safe_load(path.read_text()).get("train") or {}).get("sparse_transport_density")
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128,
                        help="local batch per modality (deploy/params.paper.yaml: 32,768 / 256 workers = 128)")
    parser.add_argument("--width", type=int, default=55_296, help="head width (768 x 72 = 55,296)")
    parser.add_argument("--density", type=float, action="append", help=f"densities (default {DENSITIES})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "sparse_transport_gloo.json"))
    args = parser.parse_args(argv)

    result = run(args.workers, args.batch, args.width, args.density or DENSITIES, args.repeats)
    result["project_thresholds"] = current_thresholds()
    mb = 1 / 2**20
    print(f"{args.workers} gloo workers on {result['cores']} cores, block {2 * args.batch} x {args.width} fp32 "
          f"({result['rows'][0]['dense_bytes'] * mb:.0f} MiB dense), median of {args.repeats}")
    print(f"{'density':>8} {'dense ms':>9} {'sparse ms':>10} {'sp/dense':>9} {'dense MiB':>10} {'sparse MiB':>11} "
          f"{'all_gather ms':>14} {'step dense s':>13} {'step sparse s':>14}")
    for r in result["rows"]:
        print(f"{r['density']:>8g} {r['dense_s'] * 1e3:>9.1f} {r['sparse_s'] * 1e3:>10.1f} "
              f"{r['sparse_over_dense_time']:>9.2f} {r['dense_bytes'] * mb:>10.1f} {r['sparse_bytes'] * mb:>11.1f} "
              f"{r['all_gather_s'] * 1e3:>14.1f} {r['step_dense_s']:>13.2f} {r['step_sparse_s']:>14.2f}")
    sw = result["switch_over"]
    print(f"switch-over: sparse wins at density <= {sw['highest_winning_density']} "
          f"(interpolated crossing {sw['interpolated']}); project: {result['project_thresholds']}")
    print(f"-> {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
