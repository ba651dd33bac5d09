"""Encode input sets with a pool of model actors, each set written resumably and atomically.

One Ray Data run per call: every pending set of :mod:`pipeline.activations.inputs` goes through
one ``ActorPoolStrategy`` pool (the actor class loads its model once: the sparse encoder, the
Clarity reference encoder, the SAE's dense inputs) and is written as Parquet partitioned by set.
A finished set is renamed into place with a fingerprint of the model and params, so a rerun skips
what is done and an interrupted run leaves no half-written set behind. Torch-free, like the inputs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from pipeline.activations.inputs import InputSet, input_dataset
from pipeline.io import write_json

if TYPE_CHECKING:
    from pipeline.config import ExtractParams

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"


def is_complete(folder: Path, fingerprint: str) -> bool:
    marker = folder / COMPLETE
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def write_sets(label: str, sets: dict[str, InputSet], out_dir: Path, fingerprint: str, actor_args: dict[str, Any],
               params: ExtractParams, task_cpus: float, actor: type) -> dict[str, int]:
    """Encode several sets in a single Ray Data run (one actor pool, models loaded once), written
    partitioned by set; sets already complete for this fingerprint are skipped. Each finished set
    lands atomically in ``out_dir/<set>/`` with its row count."""
    from ray.data import ActorPoolStrategy

    pending = {name: spec for name, spec in sets.items() if not is_complete(out_dir / name, fingerprint)}
    if pending:
        from pipeline.cluster import require_data_pool

        require_data_pool(label, params.actors, task_cpus, params.actor_gpus)
        log.info("%s: encoding %s", label, ", ".join(pending))
        tmp = out_dir / f".{label}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        input_dataset(pending, params, task_cpus).map_batches(
            actor, fn_constructor_kwargs=actor_args, batch_size=params.batch_size,
            compute=ActorPoolStrategy(size=params.actors), num_cpus=task_cpus, num_gpus=params.actor_gpus or None,
        ).write_parquet(str(tmp), partition_cols=["set"])
        for name in pending:
            written = tmp / f"set={name}"
            written.mkdir(parents=True, exist_ok=True)  # an empty set still completes
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in written.glob("*.parquet"))
            write_json(written / COMPLETE, {"set": name, "rows": rows, "fingerprint": fingerprint})
            shutil.rmtree(out_dir / name, ignore_errors=True)
            written.rename(out_dir / name)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("%s: %s already complete, skipping", label, ", ".join(sets))
    return {name: json.loads((out_dir / name / COMPLETE).read_text())["rows"] for name in sets}
