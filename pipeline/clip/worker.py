"""The Ray Train worker of Sparse CLIP training: one loop for 2 CPU workers on gloo and N GPUs on
NCCL. Each worker resumes from the latest checkpoint if there is one, steps :mod:`.recipe`'s
recipe to the run's step count, and reports checkpoints through ``ray.train.report``:

- resume checkpoints every ``checkpoint_every`` steps; after a worker dies the group restarts from
  the latest one and finishes with the same step count (``FailureConfig(max_failures)``);
- the paper's evolution snapshots at 1/3/10/30/100% of training, kept for good through a score
  that ranks them above every resume checkpoint.

Rank 0 logs metrics straight into the stage's MLflow run; after a restart, steps already in the
run are not written again, so nothing logged is lost or duplicated. Where each worker ran is
reported by rank 0 with every checkpoint (the driver writes it to ``workers.json``).
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from pipeline.clip.feature_cache import cached_split
from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.model import SparseCLIP, build_model, save_model
from pipeline.clip.recipe import (
    ProgressLog,
    RecipeStep,
    autocast_dtype_for,
    evolution_steps,
    load_val,
    make_optimizer,
    shuffled_batches,
)
from pipeline.config import ModelParams, TrainParams
from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays
from pipeline.runtime import raytrain

log = logging.getLogger(__name__)

EVOLUTION_SCORE = 1e12  # evolution snapshots outrank every resume checkpoint, so they are kept

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: resume if a checkpoint exists, train to ``total_steps``, report."""
    import ray.train
    import ray.train.torch

    train_params = TrainParams.model_validate(config["train"])
    model_params = ModelParams.model_validate(config["model"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])  # same init on every rank; DDP also broadcasts rank 0's
    raytrain.set_threads(train_params)

    model = build_model(model_params)
    if train_params.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(device)
    optimizer = make_optimizer(model, train_params.optim)
    step = _restore(model, optimizer)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    objective = SparseClipObjective(model_params, rank, world, loss=train_params.loss,
                                    sparse_transport_density=train_params.sparse_transport_density)
    autocast_dtype = autocast_dtype_for(train_params.precision, device)
    placement = raytrain.worker_placement(device, autocast_dtype)

    total, per_epoch = config["total_steps"], config["steps_per_epoch"]
    train_step = RecipeStep(model, optimizer, objective, train_params.optim, total, autocast_dtype, ddp_model)
    log_progress = _rank0_progress(config, model, train_params, device, step) if rank == 0 else None
    epoch_batches = _batch_source(config["data_dir"], train_params, model, (rank, world),
                                  config["seed"] + 7919 * rank, device, config.get("feature_cache_dir"))
    snapshots = evolution_steps(train_params.evolution, total)
    for epoch, batch in remaining_batches(epoch_batches, step, total, per_epoch):
        losses, outputs, lr = train_step(batch, step)
        step += 1
        _fault_once(config.get("fault"), step, rank)
        if log_progress is not None:
            log_progress(step, epoch, losses, outputs, lr)
        if step % train_params.checkpoint_every == 0 or step in snapshots or step == total:
            _report(model, optimizer, step, snapshots.get(step), rank, placement)

def remaining_batches(epoch_batches, step: int, total: int, per_epoch: int):
    """(epoch, batch) for steps ``step`` .. ``total`` - 1: a run resumed at ``step`` skips the
    batches its epoch already trained on, so it sees the very batches, in the same order, that the
    uninterrupted run saw (each epoch's order depends only on its seed)."""
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        for batch in islice(epoch_batches(epoch), offset, min(per_epoch, offset + total - step)):
            yield epoch, batch
            step += 1

def _rank0_progress(config: dict[str, Any], model: SparseCLIP, train_params: TrainParams, device: torch.device,
                    resumed_at: int):
    """Rank 0's logging: the val split loaded once, :class:`ProgressLog` for what is due, the
    stage's MLflow run as the sink (tagged with the step a resume started from)."""
    sink = raytrain.MetricSink(config.get("tracking_uri"), config.get("run_id"))
    if resumed_at:
        sink.note_resume(resumed_at)
    val = load_val(config["data_dir"], ClipBatchPreprocessor.for_model(model), train_params.val_images,
                   config.get("feature_cache_dir"))
    progress = ProgressLog(model, train_params, config["total_steps"], val, device)

    def log_progress(step: int, epoch: int, losses, outputs, lr: float) -> None:
        if metrics := progress.after_step(step, losses, outputs, lr):
            sink.log({"epoch": epoch, **metrics}, step)

    return log_progress

def _batch_source(data_dir: str, train_params: TrainParams, model: SparseCLIP, part: tuple[int, int], seed: int,
                  device: torch.device, cache_dir: str | None = None):
    """epoch -> iterator of this worker's batches.

    From the feature cache (``cache_dir``, locked towers): the worker's slice of the cached
    tower outputs, and the model steps on them (:meth:`SparseCLIP.read_cached_inputs`).

    Cached (small data): the worker decodes its slice of the train split once, in its own process
    (rows rank, rank + world, ... in shard order), and reshuffles it in memory each epoch. On 2
    cores this takes ~11 s for the embedded 10,800 pairs, where a Ray Data streaming split took
    ~50 s, most of it starting its coordinator and cold workers; and the order
    of rows cannot depend on which task finished first. Streamed (data larger than memory): Ray
    Data feeds every epoch through the trainer's dataset shard, with a local shuffle buffer."""
    import ray.train

    batch_size = train_params.global_batch_size // part[1]
    if cache_dir is not None:  # the locked towers' outputs, encoded once by the tower_cache stage
        model.read_cached_inputs(True)
        data = {k: torch.as_tensor(v).to(device) for k, v in cached_split(cache_dir, data_dir, "train", part=part).items()}
        log.info("worker %d of %d: %d cached training pairs", *part, len(data["text"]))
        return lambda epoch: shuffled_batches(data, batch_size, seed + epoch)
    if not train_params.cache_data:
        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch, device=device, dtypes={"image": torch.float32, "text": torch.int64},
        )
    started = time.perf_counter()
    arrays, _ = load_split_arrays(data_dir, "train", ClipBatchPreprocessor.for_model(model),
                                  part=part)
    data = {"image": torch.as_tensor(arrays["image"]).to(device), "text": torch.as_tensor(arrays["text"]).to(device)}
    log.info("worker %d of %d: decoded %d training pairs in %.1f s", *part, len(data["text"]),
             time.perf_counter() - started)
    return lambda epoch: shuffled_batches(data, batch_size, seed + epoch)

def _fault_once(fail: dict[str, Any] | None, step: int, rank: int) -> None:
    """Fault injection: with ``{"step", "rank", "marker"}`` in the loop config (``fault``), that
    worker dies once at that step (the marker file makes it once), so a cluster's restart from
    checkpoints (``train.max_failures``) can be seen to work end to end."""
    if fail and step == fail["step"] and rank == fail["rank"] and not Path(fail["marker"]).exists():
        Path(fail["marker"]).write_text(str(step))
        raise RuntimeError(f"injected worker failure at step {step} on rank {rank}")

def _report(model: SparseCLIP, optimizer, step: int, evolution: list[float] | None, rank: int,
            placement: list[dict[str, Any]]) -> None:
    """Every rank reports; rank 0 attaches the model and optimiser state and the placement. The
    score ranks evolution snapshots above every resume checkpoint, so Ray keeps them for good."""
    score = EVOLUTION_SCORE + step if evolution else float(step)
    metrics = {"step": step, "keep_score": score, "evolution": list(evolution or []), "workers": placement}

    def write(folder: Path) -> None:
        save_model(model, folder)
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, folder / "state.pt")

    raytrain.report(metrics, rank, write)

def _restore(model: SparseCLIP, optimizer) -> int:
    """The step to start from: the restored checkpoint's, or 0 on a fresh start."""

    def read(folder: Path) -> int:
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    step = raytrain.restore(read)
    if step is not None:
        log.warning("resumed from checkpoint at step %d", step)
    return step or 0
