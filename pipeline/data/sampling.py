"""The sample stage: a seeded random subset of a source, validated, written as split shards.

The paper trains on a random 15M-pair subset of MetaCLIP; here the same code draws N pairs from
any source. Planning is cheap and happens on the driver (choose refs, assign splits by a hash
of each record's group so all captions of one photo land in one split, cut shards); reading,
validating and writing happen in one Ray Data task per shard, so it scales with the cluster.
Bad records are skipped and counted by reason in ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RayParams, SampleParams
from pipeline.data.evalsets import build_eval_sets
from pipeline.data.records import Record, Skip, validate
from pipeline.data.shards import SPLITS, index_name, shard_name, write_shard
from pipeline.data.sources import make_source
from pipeline.io import file_sha256, staged_output_dir, write_json

MAX_LISTED_SKIPS = 1000  # the manifest lists this many skipped records by name, counts them all


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    refs: list[str]

    @property
    def path(self) -> str:
        return f"{self.split}/{shard_name(self.index)}.tar"


def split_of(group: str, seed: int, fractions: dict[str, float]) -> str:
    """Deterministic split of a group: a seeded hash mapped onto the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += fractions[split]
        if u < edge:
            return split
    return SPLITS[-1]


def plan_shards(refs: list[str], groups: list[str], params: SampleParams) -> list[ShardPlan]:
    """Choose ``n`` refs with a seeded permutation and cut each split into shards, in source order."""
    n = len(refs) if params.n is None else min(params.n, len(refs))
    chosen = np.sort(np.random.default_rng(params.seed).permutation(len(refs))[:n])
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i in chosen:
        by_split[split_of(groups[i], params.seed, params.splits.as_dict())].append(refs[i])
    size = params.shard_size
    return [
        ShardPlan(split, k, members[start : start + size])
        for split, members in by_split.items()
        for k, start in enumerate(range(0, len(members), size))
    ]


def build_shard(plan: dict[str, Any], params: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Ray task body: load, validate and write one shard; return its counts and skips."""
    p = SampleParams.model_validate(params)
    shard = ShardPlan(**plan)
    source = make_source(p.source)
    kept: list[Record] = []
    skips: list[Skip] = []
    for raw in source.load(shard.refs):
        result = validate(raw, min_side=p.min_image_side, max_aspect=p.max_aspect_ratio,
                          require_sidecar=p.source.kind == "webdataset" and p.source.require_sidecar)
        (kept if isinstance(result, Record) else skips).append(result)
    written = write_shard(kept, Path(out_dir) / shard.path) if kept else 0
    return {
        "split": shard.split,
        "shard": shard.path if kept else None,
        "requested": len(shard.refs),
        "written": written,
        "skipped": [{**asdict(s), "reason": str(s.reason)} for s in skips],
    }


def run_sample(params: SampleParams, ray_params: RayParams) -> dict[str, Any]:
    """Plan, build every shard with Ray Data, derive the eval sets, write ``manifest.json``.

    Everything is written into a staging folder beside ``out_dir`` and swapped in whole at the
    end: a rerun into an existing sample never mixes old shards with new ones, and an interrupted
    run leaves the previous sample as it was."""
    params = with_absolute_paths(params)
    out_dir = Path(params.out_dir)
    with staged_output_dir(out_dir, "sample") as staging:
        manifest = _sample_into(params.model_copy(update={"out_dir": str(staging)}), ray_params)
        if empty := _empty_splits(manifest, params):
            raise ValueError(f"sample: no record landed in the {', '.join(empty)} split(s) ({manifest['written']} "
                             f"written of {manifest['requested']} requested, skipped by reason: "
                             f"{manifest['skipped_by_reason'] or 'none'}); {out_dir} is left as it was")
        manifest["eval_sets"] = build_eval_sets(staging)
        write_json(staging / "manifest.json", manifest)
    return manifest


def _sample_into(params: SampleParams, ray_params: RayParams) -> dict[str, Any]:
    """Build every shard into ``params.out_dir`` with one Ray Data task each; the merged manifest."""
    import ray

    from pipeline.runtime.cluster import connect

    source = make_source(params.source)
    refs = source.refs()
    plans = plan_shards(refs, [source.group(r) for r in refs], params)
    connect(ray_params)
    items = [{"plan": json.dumps(asdict(plan))} for plan in plans]
    results = (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        .map(_build_row, fn_kwargs={"params": params.model_dump(mode="json")}, num_cpus=ray_params.task_cpus)
        .take_all()
    )
    return summarise([json.loads(r["result"]) for r in results], params, len(refs))


def _empty_splits(manifest: dict[str, Any], params: SampleParams) -> list[str]:
    """Splits that got no record although the params give them a share (or nothing was written)."""
    fractions = params.splits.as_dict()
    return [split for split, n in manifest["records_by_split"].items()
            if n == 0 and (fractions[split] > 0 or not manifest["written"])]


def with_absolute_paths(params: SampleParams) -> SampleParams:
    """Resolve relative paths on the driver: Ray workers may run in another directory."""
    source = params.source
    resolved = {k: str(Path(v).resolve()) for k in ("path", "image_root") if (v := getattr(source, k))}
    return params.model_copy(update={
        "out_dir": str(Path(params.out_dir).resolve()),
        "source": source.model_copy(update=resolved),
    })


def _build_row(row: dict[str, str], params: dict[str, Any]) -> dict[str, str]:
    """Ray Data row wrapper: JSON in and out keeps nested, ragged results out of Arrow schemas."""
    result = build_shard(json.loads(row["plan"]), params, params["out_dir"])
    return {"result": json.dumps(result)}


def summarise(results: list[dict[str, Any]], params: SampleParams, source_size: int) -> dict[str, Any]:
    """Merge per-shard results into the manifest: counts by split and by skip reason, hashes."""
    results = sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["shard"] or ""))
    skipped = [s for r in results for s in r["skipped"]]
    reasons = Counter(s["reason"] for s in skipped)
    out_dir = Path(params.out_dir)
    shards = [
        {"path": r["shard"], "records": r["written"], "sha256": file_sha256(out_dir / r["shard"]),
         "index_sha256": file_sha256(out_dir / index_name(r["shard"]))}
        for r in results
        if r["shard"]
    ]
    return {
        "source": params.source.model_dump(mode="json"),
        "seed": params.seed,
        "source_records": source_size,
        "requested": sum(r["requested"] for r in results),
        "written": sum(r["written"] for r in results),
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "records_by_split": {s: sum(r["written"] for r in results if r["split"] == s) for s in SPLITS},
        "shards": shards,
        "skipped_records": skipped[:MAX_LISTED_SKIPS],
    }


