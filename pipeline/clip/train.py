"""Training Sparse CLIP with Ray Train: one loop for 2 CPU workers on gloo and N GPUs on NCCL.

The driver (:func:`run_training`) builds a ``TorchTrainer`` (and, when the train split is
streamed rather than cached in worker memory, its Ray Dataset); every worker runs
:func:`train_loop_per_worker`: open_clip's recipe (AdamW, warmup + cosine, bf16 autocast on
GPU), the logit-scale cap after each step, metrics from rank 0 straight into the stage's MLflow
run, and checkpoints through ``ray.train.report``:

- resume checkpoints every ``checkpoint_every`` steps; after a worker dies the group restarts from
  the latest one and finishes with the same step count (``FailureConfig(max_failures)``);
- the paper's evolution snapshots at 1/3/10/30/100% of training, kept for good through a score
  that ranks them above every resume checkpoint.

Where each worker ran (its Ray node) is gathered once per attempt and reported by rank 0 with
every checkpoint; the driver writes it to ``models/<variant>/workers.json``, the record that a
multi-node run really spread over the nodes.

Metrics are written to MLflow as they happen; after a restart, steps already in the run are not
written again, so nothing logged is lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import raytrain
from pipeline.clip.feature_cache import FeatureCache, cached_split
from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.model import SparseCLIP, build_model, head_parameters, save_model
from pipeline.clip.zeroshot import class_embeddings, labelled_rows, zero_shot_accuracy
from pipeline.config import ModelParams, OptimParams, Params, TrainParams
from pipeline.data.evalsets import load_zero_shot_tasks, zero_shot_label
from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays
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
from pipeline.metrics import sparsity
from pipeline.metrics.retrieval import retrieval_recall

log = logging.getLogger(__name__)

EVOLUTION_SCORE = 1e12  # evolution snapshots outrank every resume checkpoint, so they are kept


# --------------------------------------------------------------------------- schedule, optimiser


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """open_clip's schedule: linear warmup to ``base_lr``, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


def param_groups(model: torch.nn.Module, optim: OptimParams) -> list[dict[str, Any]]:
    """open_clip's split (no weight decay on gains, biases, 1-d params and the logit scale), and,
    when ``head_lr_multiplier`` / ``head_weight_decay`` are set, the wide heads in groups of their
    own. Each group carries ``lr_scale``: the schedule's lr times it is the group's lr. With the
    knobs neutral the groups are exactly open_clip's two, so training is the paper's recipe."""
    heads = not optim.neutral_heads
    head_decay = optim.weight_decay if optim.head_weight_decay is None else optim.head_weight_decay
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or any(t in name for t in ("bn", "ln", "bias", "logit_scale"))
        is_head = heads and name.startswith(SparseCLIP.HEAD_PREFIXES)
        groups.setdefault((is_head, not exclude), []).append(param)
    out = []
    for (is_head, decays), params in sorted(groups.items()):
        decay = (head_decay if is_head else optim.weight_decay) if decays else 0.0
        scale = optim.head_lr_multiplier if is_head else 1.0
        out.append({"params": params, "weight_decay": decay, "lr_scale": scale})
    return out


def make_optimizer(model: torch.nn.Module, optim: OptimParams) -> torch.optim.AdamW:
    """torch's AdamW with open_clip's parameter groups and hyperparameters, in its fused
    implementation: the same update in a few kernels instead of one per tensor and operation
    (equal to open_clip's for-each AdamW to rounding, ~1 ulp; tests/test_knobs.py). The sparse
    heads add 2 x embed_dim x width parameters, whose update was otherwise a visible share of a
    ViT-B-32 step on GPU, and on CPU it is 4.5 instead of 20-30 ms of the embedded ~100 ms step."""
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr, scaled per group (the heads' multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def evolution_steps(fractions: list[float], total: int) -> dict[int, list[float]]:
    """The fractions snapshotted at each step (at least step 1; short runs share steps)."""
    steps: dict[int, list[float]] = {}
    for fraction in sorted(fractions):
        steps.setdefault(min(total, max(1, round(fraction * total))), []).append(fraction)
    return steps


def snapshot_name(fraction: float) -> str:
    return f"{fraction * 100:g}pct.pt"


# --------------------------------------------------------------------------- metrics


class SparsityWindow:
    """L0 and feature activity accumulated over the steps between two metric logs (rank 0)."""

    def __init__(self, width: int):
        self.width = width
        self.reset()

    def reset(self) -> None:
        self.firings = None
        self.nonzeros = {"image": 0.0, "text": 0.0}
        self.rows = 0

    @torch.no_grad()
    def update(self, image: torch.Tensor, text: torch.Tensor) -> None:
        image, text = image.detach().float(), text.detach().float()
        fired = (image != 0).sum(0) + (text != 0).sum(0)  # as L0 counts: a signed (dense) feature fires when non-zero
        self.firings = fired if self.firings is None else self.firings + fired
        self.nonzeros["image"] += (image != 0).sum().item()
        self.nonzeros["text"] += (text != 0).sum().item()
        self.rows += image.shape[0]

    def summary(self) -> dict[str, float]:
        """``l0_<tower>``, ``l0_<tower>_pct`` and ``dead_fraction`` (no firing on either tower in the
        window), by :mod:`pipeline.metrics.sparsity`'s definitions."""
        out = {}
        for tower, nonzeros in self.nonzeros.items():
            tally = sparsity.l0_summary(nonzeros, self.rows, self.width)
            out[f"l0_{tower}"], out[f"l0_{tower}_pct"] = tally["l0"], tally["l0_pct"]
        out["dead_fraction"] = sparsity.dead_share(self.firings.cpu().numpy()) if self.firings is not None else 1.0
        return out


@torch.no_grad()
def validation_eval(model: SparseCLIP, val: dict[str, Any], device: torch.device) -> dict[str, float]:
    """On the val split: top-1/top-5 zero-shot accuracy for every labelled task (shape, colour)
    and image<->caption retrieval recall (each val image against its own caption) when no val
    embedding is all-zero."""
    model.eval()
    tokenize = val["preprocessor"].tokens
    images, texts = torch.as_tensor(val["images"]).to(device), torch.as_tensor(val["texts"]).to(device)
    if model.cached_inputs:  # the val pairs are the locked towers' cached outputs
        features, captions = model.encode_image_features(images).float(), model.encode_text_features(texts).float()
    else:
        features, captions = model.encode_image(images).float(), model.encode_text(texts).float()
    out = {}
    # An all-zero embedding (every ReLU off, possible early on) has no cosine similarity; retrieval
    # is then skipped for this evaluation rather than scored on a subset of the val images.
    if (features.abs().sum(-1) > 0).all() and (captions.abs().sum(-1) > 0).all():
        out.update({f"val/{k}": v for k, v in retrieval_recall(features.cpu().numpy(), captions.cpu().numpy(),
                                                                np.arange(len(captions))).items()})
    for task, spec in val["tasks"].items():
        classifier = class_embeddings(
            lambda t: model.encode_text(torch.as_tensor(t).to(device)).float(), tokenize,
            spec["classes"], spec["templates"],
        )
        rows, labels = labelled_rows(val["labels"][task], spec["classes"])
        for k, acc in zero_shot_accuracy(features[rows], classifier, labels).items():
            out[f"zeroshot/{task}/{k}"] = acc
    model.train()
    return out


def load_val(data_dir: str, preprocessor: ClipBatchPreprocessor, limit: int | None,
             cache_dir: str | None = None) -> dict[str, Any]:
    """The val split decoded once (or read from the feature cache): images, captions, zero-shot
    tasks and each image's labels."""
    tasks = load_zero_shot_tasks(data_dir)
    arrays, metas = load_split_arrays(data_dir, "val", preprocessor, limit=limit, decode=cache_dir is None)
    if cache_dir is not None:
        arrays = cached_split(cache_dir, data_dir, "val", limit)
    labels = {task: [zero_shot_label(m, task) for m in metas] for task in tasks}
    return {"tasks": tasks, "images": arrays["image"], "texts": arrays["text"], "labels": labels,
            "preprocessor": preprocessor}


# --------------------------------------------------------------------------- the worker loop


class RecipeStep:
    """One optimisation step of the paper's recipe: the scheduled lr (scaled per group), forward
    under autocast, the objective, backward, optional clipping, AdamW, then the logit-scale cap.
    Shared by the Ray Train workers and the in-process ablation runs, so both train the same way."""

    def __init__(self, model: SparseCLIP, optimizer: torch.optim.Optimizer, objective: SparseClipObjective,
                 optim: OptimParams, total: int, autocast_dtype: torch.dtype | None = None, forward=None):
        self.model, self.optimizer, self.objective, self.optim, self.total = model, optimizer, objective, optim, total
        self.forward = forward or model
        device_type = next(model.parameters()).device.type
        self.autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()

    def __call__(self, batch: dict[str, torch.Tensor], step: int):
        """Train on ``batch`` as step ``step`` (0-based); returns (losses, outputs, lr)."""
        lr = lr_at(step, self.total, self.optim.warmup_steps, self.optim.lr)
        set_lr(self.optimizer, lr)
        with self.autocast:
            outputs = self.forward(batch["image"], batch["text"])
            losses = self.objective(outputs)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip_norm)
        self.optimizer.step()
        self.model.clamp_logit_scale_()
        return losses, outputs, lr


class ProgressLog:
    """What rank 0 logs after each step: losses, the sparsity window, the logit scale and throughput
    every ``log_every`` steps, validation zero-shot and retrieval every ``eval_every`` (and at the end)."""

    def __init__(self, model: SparseCLIP, train_params: TrainParams, total: int, val: dict[str, Any] | None,
                 device: torch.device):
        self.model, self.params, self.total, self.val, self.device = model, train_params, total, val, device
        self.window = SparsityWindow(model.width)
        self.started, self.steps = time.perf_counter(), 0
        self.trained, self.mark = 0.0, time.perf_counter()  # seconds of training, evaluations excluded

    def after_step(self, step: int, losses: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                   lr: float) -> dict[str, float]:
        """Metrics due at ``step`` (1-based count of steps done); empty when none are."""
        self.trained += time.perf_counter() - self.mark
        metrics = self._due(step, losses, outputs, lr)
        if metrics:
            metrics["train/seconds"] = self.trained
        self.mark = time.perf_counter()
        return metrics

    def _due(self, step: int, losses: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
             lr: float) -> dict[str, float]:
        self.window.update(outputs["image_raw"], outputs["text_raw"])
        self.steps += 1
        metrics: dict[str, float] = {}
        if step % self.params.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.started
            metrics.update({f"train/{k}": v.item() for k, v in losses.items()})
            metrics.update({f"train/{k}": v for k, v in self.window.summary().items()})
            metrics["train/logit_scale"] = self.model.logit_scale.exp().item()
            metrics["train/lr"] = lr
            metrics["train/samples_per_s"] = self.steps * self.params.global_batch_size / elapsed
            self.window.reset()
            self.started, self.steps = time.perf_counter(), 0
        if self.val is not None and (step % self.params.eval_every == 0 or step == self.total):
            metrics.update(validation_eval(self.model, self.val, self.device))
        return metrics


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
    autocast_dtype = _autocast_dtype(train_params.precision, device)
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
        _maybe_fail(config, step, rank)
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


def shuffled_batches(data: dict[str, torch.Tensor], batch_size: int, seed: int):
    """One epoch of in-memory data in a seeded random order, in full batches."""
    order = torch.randperm(len(data["text"]), generator=torch.Generator().manual_seed(seed))
    device = data["text"].device
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size].to(device)
        yield {key: value[idx] for key, value in data.items()}


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked, or by default on GPU; None: full fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def _maybe_fail(config: dict[str, Any], step: int, rank: int) -> None:
    """Test hook: a worker dies once at a given step (the marker file makes it once)."""
    fail = config.get("fail_once")
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


# --------------------------------------------------------------------------- the driver


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


def run_training(params: Params, variant: str, *, run_id: str | None = None, tracking_uri: str | None = None,
                 fail_once: dict[str, Any] | None = None) -> TrainOutcome:
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
        config={
            "train": train_params.model_dump(mode="json"), "model": model_params.model_dump(mode="json"),
            "seed": params.project.seed, "data_dir": data_dir, "total_steps": total, "steps_per_epoch": per_epoch,
            "run_id": run_id, "tracking_uri": tracking_uri, "fail_once": fail_once,
            "feature_cache_dir": feature_cache_dir(params, model_params),
        },
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
    from pipeline.cluster import connect
    from pipeline.data.loading import ray_split_dataset

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


# --------------------------------------------------------------------------- one process, no Ray


def train_in_process(model_params: ModelParams, train_params: TrainParams, data: dict[str, np.ndarray],
                     val: dict[str, Any] | None, steps: int, seed: int,
                     device: torch.device = torch.device("cpu"), batches: Callable[..., Iterator[dict]] | None = None,
                     cached_inputs: bool = False) -> tuple[SparseCLIP, dict[int, dict[str, float]]]:
    """The same recipe as the Ray Train workers (:class:`RecipeStep`, :class:`ProgressLog`), in this
    process on in-memory arrays, for ``steps`` steps of ``train_params.global_batch_size``: what the
    ablation sweep runs many times side by side. ``batches(data, batch_size, seed)`` yields one
    epoch of batches (default :func:`shuffled_batches`; a benchmark may compose its own, e.g. hard
    negatives). ``cached_inputs``: ``data`` holds the locked towers' cached outputs (the feature
    cache). Returns the model and its logged curves."""
    batches = batches or shuffled_batches
    torch.manual_seed(seed)
    model = build_model(model_params).to(device)
    model.read_cached_inputs(cached_inputs)
    optimizer = make_optimizer(model, train_params.optim)
    objective = SparseClipObjective(model_params)
    train_step = RecipeStep(model, optimizer, objective, train_params.optim, steps,
                            _autocast_dtype(train_params.precision, device))
    progress = ProgressLog(model, train_params, steps, val, device)
    tensors = {key: torch.as_tensor(data[key]).to(device) for key in ("image", "text")}
    if len(tensors["text"]) < train_params.global_batch_size:
        raise ValueError(f"{len(tensors['text'])} training pairs are fewer than one batch of "
                         f"{train_params.global_batch_size}")
    curves: dict[int, dict[str, float]] = {}
    step, epoch = 0, 0
    while step < steps:
        for batch in batches(tensors, train_params.global_batch_size, seed * 100_003 + epoch):
            losses, outputs, lr = train_step(batch, step)
            step += 1
            if metrics := progress.after_step(step, losses, outputs, lr):
                curves[step] = {"epoch": epoch, **metrics}
            if step >= steps:
                break
        epoch += 1
    return model.eval(), curves
