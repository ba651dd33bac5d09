"""Ray Train glue shared by the CLIP and the VLM trainers: where runs are stored, a
``TorchTrainer`` built from a stage's :class:`~pipeline.config.WorkerGroupParams`, how workers
report (rank 0 attaching a checkpoint) and restore, where each worker ran, and rank 0's line to
the stage's MLflow run.

Everything here is about Ray Train's mechanics, nothing about what is trained; the trainers
(:mod:`pipeline.clip.train`, :mod:`pipeline.vlm.train`) say what a step is and what a
checkpoint holds.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.config import Params, WorkerGroupParams
from pipeline.io import claim_output_dir, remove_output_dir

T = TypeVar("T")


def storage_path(path: str) -> str:
    """Ray's storage for run folders: a URI as given (s3://, gs://, a shared filesystem's), a
    local path made absolute (workers on other nodes resolve it from their own working dirs)."""
    return path if "://" in path else str(Path(path).resolve())


def is_local(storage: str) -> bool:
    return "://" not in storage


def make_trainer(params: Params, what: str, group: WorkerGroupParams, worker: Callable[[dict[str, Any]], None],
                 config: dict[str, Any], name: str, **run_config: Any):
    """Connect to the cluster, fail at once when it can never place ``group``'s workers (Ray
    Train would wait forever), and build the ``TorchTrainer``. ``run_config`` goes to Ray's
    ``RunConfig`` (failure and checkpoint configs), except ``datasets``, which the trainer takes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.runtime.cluster import (
        connect,
        on_one_machine,
        require_resources,
        worker_resources,
    )
    from pipeline.runtime.process_group import torch_config

    connect(params.ray)
    storage = storage_path(params.ray.storage_path)
    if is_local(storage):  # the proof that lets discard_run_folder delete it later
        claim_output_dir(Path(storage) / name, what)
    require_resources(what, worker_resources(group.resources_per_worker, group.use_gpu), group.num_workers,
                      params.ray.wait_for_resources)
    datasets = run_config.pop("datasets", None)
    return TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=torch_config(on_one_machine()),
        scaling_config=ray.train.ScalingConfig(
            num_workers=group.num_workers, use_gpu=group.use_gpu,
            resources_per_worker=dict(group.resources_per_worker), placement_strategy=group.placement_strategy,
        ),
        # Ray Train's own INFO lines (worker-group start-up, and two long lines per checkpoint) stay in the
        # session's logs/train files; the console shows its warnings beside the stage's own progress.
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING"), **run_config),
        datasets=datasets,
    )


def discard_run_folder(result, params: Params) -> None:
    """Delete a finished run's checkpoint folder once the stage has exported what it needs
    (unless ``train.keep_ray_checkpoints``): every run would otherwise leave its checkpoints
    behind (~100 MB for a VLM, 259 MB for a tiny CLIP run). Remote storage is left alone, and a
    local folder only goes if :func:`make_trainer` marked it as the run's."""
    if not params.train.keep_ray_checkpoints and is_local(storage_path(params.ray.storage_path)):
        remove_output_dir(result.path)


# --------------------------------------------------------------------------- inside a worker


def set_threads(group: WorkerGroupParams) -> None:
    """Torch threads per worker, when the params name a number."""
    if group.threads_per_worker:
        torch.set_num_threads(group.threads_per_worker)


def report(metrics: dict[str, Any], rank: int, write_checkpoint: Callable[[Path], None] | None = None) -> None:
    """Every rank reports (``ray.train.report`` is a barrier); rank 0 attaches a checkpoint of
    the files ``write_checkpoint`` puts in a fresh folder, when given one."""
    import ray.train

    if rank != 0 or write_checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(read_checkpoint: Callable[[Path], T]) -> T | None:
    """``read_checkpoint(folder)`` on the checkpoint this attempt starts from (after a worker
    restart, or a rerun of the same run name), or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return read_checkpoint(Path(folder))


def worker_placement(device: torch.device, autocast_dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Every worker's rank, Ray node, device, collective backend and autocast dtype, gathered on all
    ranks (a collective: call on every rank): the record that a run used the nodes and GPUs it asked for."""
    import ray
    import ray.train

    context = ray.train.get_context()
    distributed = torch.distributed.is_initialized()
    mine = {"rank": context.get_world_rank(), "local_rank": context.get_local_rank(),
            "node_rank": context.get_node_rank(), "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(device), "backend": torch.distributed.get_backend() if distributed else None,
            "autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None}
    if context.get_world_size() == 1 or not distributed:
        return [mine]
    everyone: list[Any] = [None] * context.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return sorted(everyone, key=lambda w: w["rank"])


class MetricSink:
    """Rank 0's line to the stage's MLflow run; skips steps a previous attempt already logged."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, first_key: str = "train/loss"):
        self.client = self.run_id = None
        self.logged_up_to = -1
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id
            history = self.client.get_metric_history(run_id, first_key)
            self.logged_up_to = max((m.step for m in history), default=-1)

    def note_resume(self, step: int) -> None:
        """Tag the run with the step training resumed from (a worker restart or a driver rerun)."""
        if self.client is not None:
            self.client.set_tag(self.run_id, "resumed_from_step", str(step))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None or step <= self.logged_up_to:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=entries)
