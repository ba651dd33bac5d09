"""Training Sparse CLIP with Ray Train: the driver.

:func:`run_training` builds a ``TorchTrainer`` (and, when the train split is streamed rather than
cached in worker memory, its Ray Dataset) whose workers run :func:`.worker.train_loop_per_worker`,
names the run after what makes two trainings the same (a rerun resumes), then exports the final
weights and the evolution snapshots from Ray's checkpoints into ``models/<variant>/``. The recipe
itself is :mod:`.recipe` (torch alone); the worker loop :mod:`.worker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.clip.feature_cache import FeatureCache
from pipeline.clip.model import build_model, head_parameters
from pipeline.clip.recipe import snapshot_name
from pipeline.clip.worker import train_loop_per_worker
from pipeline.config import ModelParams, Params, TrainParams
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.data.shards import verify_shards
from pipeline.io import (
    check_output_dir,
    exclusive_lock,
    file_sha256,
    is_owned_output,
    remove_output_dir,
    staged_output_dir,
    write_json,
)
from pipeline.runtime import raytrain

log = logging.getLogger(__name__)

@dataclass
class TrainOutcome:
    model_dir: Path
    total_steps: int
    snapshots: dict[str, str]
    workers: list[dict[str, Any]]

def training_section(params: Params, variant: str) -> dict[str, Any]:
    """The params one variant's training reads: the ``train`` section with its model resolved."""
    return {**params.train.model_dump(mode="json", exclude={"variants", "model"}),
            "model": params.train.model_for(variant).model_dump(mode="json")}

def training_identity(params: Params, variant: str) -> str:
    """What makes two trainings the same run: the variant's training params, the seed and the
    sampled data (its manifest lists every shard's sha256). Ray names the run after it, so a
    rerun after the driver died (Ctrl-C, SIGKILL, a lost head node) finds the killed run's
    checkpoints and resumes (Ray Train V2 restores a run from the same storage path and name)."""
    manifest = Path(params.sample.out_dir) / "manifest.json"
    payload = {"section": training_section(params, variant), "seed": params.project.seed,
               "data": file_sha256(manifest) if manifest.is_file() else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

@contextmanager
def training_lock(params: Params, variant: str) -> Iterator[None]:
    """One training of a variant at a time on this machine: two would share its Ray run folder
    (the name is the training's identity) and its output folder, and one would die mid-run."""
    with exclusive_lock(Path(params.train.out_dir) / f".{variant}.lock", f"a training of variant {variant!r}"):
        yield

# Bytes per trained parameter in fp32: the weights, their gradients and AdamW's two moments.
TRAINING_BYTES_PER_PARAM = 16

def require_memory_for(model_params: ModelParams, train_params: TrainParams) -> None:
    """Fail before Ray starts when the wide heads alone cannot be trained in this machine's
    memory (each worker holds them whole, and rank 0 copies them to host memory to checkpoint):
    an expansion typed with a few zeros too many would otherwise fail after minutes and retries."""
    heads = head_parameters(model_params)
    workers_here = 1 if train_params.use_gpu else train_params.num_workers
    needed = heads * TRAINING_BYTES_PER_PARAM * workers_here
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ValueError(f"train.model.expansion {model_params.expansion}: the two wide heads hold {heads:,} "
                         f"parameters, {needed / 2**30:,.1f} GiB to train in fp32 (weights, gradients, AdamW's "
                         f"two moments{f', x {workers_here} workers' if workers_here > 1 else ''}), more than this "
                         f"machine's {available / 2**30:,.1f} GiB of memory")

def run_training(params: Params, variant: str, *, run_id: str | None = None,
                 tracking_uri: str | None = None) -> TrainOutcome:
    """Train one variant on the sampled train split; write ``models/<variant>/`` and return it.

    The Ray run is ``<variant>-<training_identity>``: a rerun of the same training resumes from
    its last checkpoint. Checkpoints are deleted once the model is exported (unless
    ``train.keep_ray_checkpoints``); a killed run's stay until its rerun, and those of a
    variant's runs with other params or data (which nothing can resume any more) are deleted
    when the variant next trains, on local storage."""
    import ray.train

    train_params, model_params = params.train, params.train.model_for(variant)
    model_dir = check_output_dir(Path(train_params.out_dir) / variant)  # before training, not after
    require_memory_for(model_params, train_params)
    data_dir = str(Path(params.sample.out_dir).resolve())
    verify_shards(data_dir)  # a truncated or stale shard fails here, named, not inside a worker
    n_train = json.loads((Path(data_dir) / "manifest.json").read_text())["records_by_split"]["train"]
    per_epoch = n_train // train_params.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"train.global_batch_size {train_params.global_batch_size} exceeds the "
                         f"{n_train} training records: lower it or sample more")
    total = per_epoch * train_params.epochs

    name = f"{variant}-{training_identity(params, variant)}"
    storage = raytrain.storage_path(params.ray.storage_path)
    if raytrain.is_local(storage):
        remove_abandoned_runs(Path(storage), variant, keep=name)
    trainer = raytrain.make_trainer(
        params, "train", train_params, train_loop_per_worker,
        config=worker_config(params, variant, data_dir, total, per_epoch, run_id, tracking_uri),
        name=name,
        failure_config=ray.train.FailureConfig(max_failures=train_params.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=len(train_params.evolution) + 1, checkpoint_score_attribute="keep_score",
        ),
        datasets=None if train_params.cache_data else {"train": _streamed_train_split(params, model_params, data_dir)},
    )
    result = trainer.fit()
    outcome = _export(result, model_dir, total)
    raytrain.discard_run_folder(result, params)
    return outcome

def worker_config(params: Params, variant: str, data_dir: str, total: int, per_epoch: int, run_id: str | None,
                  tracking_uri: str | None) -> dict[str, Any]:
    """The loop config every worker gets: plain JSON (params as dicts), so Ray ships it anywhere."""
    model_params = params.train.model_for(variant)
    return {
        "train": params.train.model_dump(mode="json"), "model": model_params.model_dump(mode="json"),
        "seed": params.project.seed, "data_dir": data_dir, "total_steps": total, "steps_per_epoch": per_epoch,
        "run_id": run_id, "tracking_uri": tracking_uri, "feature_cache_dir": feature_cache_dir(params, model_params),
    }


def feature_cache_dir(params: Params, model_params: ModelParams) -> str | None:
    """The tower cache to train from, or None: off by params, nothing cached (towers that train),
    or a variant that cannot read it (Sparse-Avg pools the positions the cache averaged away)."""
    train_params = params.train
    if not (train_params.feature_cache and FeatureCache.available(train_params.feature_cache_dir)):
        return None
    if model_params.pooling != "cls":
        log.info("pooling %s reads every position of the feature map: training without the feature cache",
                 model_params.pooling)
        return None
    return str(Path(train_params.feature_cache_dir).resolve())

def _streamed_train_split(params: Params, model_params: ModelParams, data_dir: str):
    """The train split as a Ray Dataset, decoded by Ray Data tasks; images travel as float16."""
    from pipeline.data.loading import ray_split_dataset
    from pipeline.runtime.cluster import connect

    connect(params.ray)  # the dataset is built before the trainer joins the cluster

    probe = build_model(model_params)
    preprocessor = ClipBatchPreprocessor.for_model(probe, np.float16)
    return ray_split_dataset(data_dir, "train", preprocessor, params.ray.task_cpus)

def _export(result, model_dir: Path, total: int) -> TrainOutcome:
    """Copy the final weights and every evolution snapshot out of Ray's checkpoint storage into a
    staging folder that replaces ``model_dir`` whole once every file is written."""
    with staged_output_dir(model_dir, "train") as staging:
        snapshots = _copy_checkpoints(result, staging, total)
        workers = list(result.metrics.get("workers", []))
        write_json(staging / "workers.json", workers)
    return TrainOutcome(model_dir, total, dict(sorted(snapshots.items())), workers)

def _copy_checkpoints(result, model_dir: Path, total: int) -> dict[str, str]:
    """The final weights and the evolution snapshots of ``result`` into ``model_dir``; the
    snapshots' names -> the step each was taken at."""
    snapshots = {}
    for checkpoint, metrics in result.best_checkpoints:
        with checkpoint.as_directory() as folder:
            for fraction in metrics.get("evolution", []):
                name = snapshot_name(fraction)
                (model_dir / "evolution").mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(folder) / "model.pt", model_dir / "evolution" / name)
                snapshots[name] = f"step {int(metrics['step'])}"
            if int(metrics["step"]) == total:
                shutil.copy(Path(folder) / "model.pt", model_dir / "model.pt")
                shutil.copy(Path(folder) / "config.json", model_dir / "config.json")
    if not (model_dir / "model.pt").is_file():
        raise RuntimeError(f"training ended without a final checkpoint at step {total}")
    return snapshots

def remove_abandoned_runs(storage: Path, variant: str, keep: str) -> list[Path]:
    """Delete the Ray run folders of ``variant`` other than ``keep`` (runs with other params or
    data, killed before they finished: their identity no longer matches, so nothing resumes them)."""
    removed = [p for p in storage.glob(f"{variant}-*") if p.name != keep
               and p.name.removeprefix(f"{variant}-").isalnum() and is_owned_output(p)]
    for path in removed:
        log.info("removing the checkpoints of an abandoned run: %s", path)
        remove_output_dir(path)
    return removed
