"""Encode input sets with a pool of model actors, each set written resumably and atomically.

One Ray Data run per call: every pending set of :mod:`pipeline.activations.inputs` goes through
one ``ActorPoolStrategy`` pool (the actor class loads its model once: the sparse encoder, the
Clarity reference encoder, the SAE's dense inputs) and is written as Parquet partitioned by set.
A finished set is renamed into place with a fingerprint of everything it was made of (the
model's weights and params the caller names, the set's own inputs), so a rerun skips what is
done and still valid, and an interrupted run leaves no half-written set behind. Torch-free, like
the inputs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from pipeline.activations.inputs import InputSet, input_dataset
from pipeline.fingerprint import inputs_fingerprint
from pipeline.io import (
    check_output_dir,
    claim_output_dir,
    remove_output_dir,
    write_json,
)

if TYPE_CHECKING:
    from pipeline.config import ExtractParams

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"


def is_complete(folder: Path, fingerprint: str) -> bool:
    marker = folder / COMPLETE
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def set_fingerprint(shared: str, spec: InputSet) -> str:
    """A set's completion fingerprint: what all sets of the call share (``shared``: weights,
    params) and the set's own inputs, so a new vocabulary re-encodes the words, not the images."""
    return inputs_fingerprint([], shared, spec.fingerprint())


def write_sets(label: str, sets: dict[str, InputSet], out_dir: Path, fingerprint: str, actor_args: dict[str, Any],
               params: ExtractParams, task_cpus: float, actor: type) -> dict[str, int]:
    """Encode several sets in a single Ray Data run (one actor pool, models loaded once), written
    partitioned by set; a set already complete for its fingerprint is skipped. ``fingerprint``
    must cover every input the actors read besides the sets' own (build it with
    :func:`pipeline.fingerprint.inputs_fingerprint`). Each finished set lands atomically in
    ``out_dir/<set>/`` with its row count."""
    fingerprints = {name: set_fingerprint(fingerprint, spec) for name, spec in sets.items()}
    pending = {name: spec for name, spec in sets.items()
               if not is_complete(_set_dir(out_dir, name), fingerprints[name])}
    if done := [name for name in sets if name not in pending]:
        log.info("%s: %s already complete, skipping", label, ", ".join(done))
    if pending:
        _encode(label, pending, out_dir, fingerprints, actor_args, params, task_cpus, actor)
    return {name: json.loads((out_dir / name / COMPLETE).read_text())["rows"] for name in sets}


def _encode(label: str, pending: dict[str, InputSet], out_dir: Path, fingerprints: dict[str, str],
            actor_args: dict[str, Any], params: ExtractParams, task_cpus: float, actor: type) -> None:
    """One Ray Data run over the pending sets, each then moved into place with its fingerprint.
    Every folder it will replace is checked first: a folder this pipeline did not write fails
    the stage before any encoding, not after it."""
    from ray.data import ActorPoolStrategy

    from pipeline.runtime.cluster import require_data_pool

    for name in pending:
        check_output_dir(_set_dir(out_dir, name))
    require_data_pool(label, params.actors, task_cpus, params.actor_gpus)
    log.info("%s: encoding %s", label, ", ".join(pending))
    tmp = out_dir / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # our own scratch folder, named by this module
    input_dataset(pending, params, task_cpus).map_batches(
        actor, fn_constructor_kwargs=actor_args, batch_size=params.batch_size,
        compute=ActorPoolStrategy(size=params.actors), num_cpus=task_cpus, num_gpus=params.actor_gpus or None,
    ).write_parquet(str(tmp), partition_cols=["set"])
    for name in pending:
        _put_in_place(label, tmp / f"set={name}", _set_dir(out_dir, name), fingerprints[name])
    shutil.rmtree(tmp, ignore_errors=True)


def _put_in_place(label: str, written: Path, dest: Path, fingerprint: str) -> None:
    """Mark a written set as the pipeline's (:func:`pipeline.io.claim_output_dir`: the marker
    travels with the folder, so the next rerun may replace it), record its rows and fingerprint,
    and rename it over the previous set, which is deleted only if it carries the same marker."""
    claim_output_dir(written, label)  # also creates the folder of an empty set, which still completes
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in written.glob("*.parquet"))
    write_json(written / COMPLETE, {"set": dest.name, "rows": rows, "fingerprint": fingerprint})
    remove_output_dir(dest)
    written.rename(dest)


def _set_dir(out_dir: Path, name: str) -> Path:
    """``out_dir/<name>``; a set name is one plain folder name (a labelled folder's name comes
    from params), never a path that could lead a replacement outside ``out_dir``."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"set name {name!r}: must be one plain folder name (no '/', '.' or '..')")
    return out_dir / name
