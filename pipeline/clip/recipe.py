"""The paper's training recipe in torch alone: open_clip's schedule and optimiser groups, one
optimisation step (autocast, the objective, AdamW, the logit-scale cap), what rank 0 logs, and the
validation pass. The Ray Train workers (:mod:`.worker`) and the in-process runs of the ablation and
the benchmarks (:func:`train_in_process`) share it, so every training trains the same way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.model import SparseCLIP, build_model
from pipeline.config import ModelParams, OptimParams, TrainParams
from pipeline.metrics import sparsity
from pipeline.metrics.retrieval import retrieval_recall
from pipeline.metrics.zeroshot import class_embeddings, labelled_rows, zero_shot_accuracy

log = logging.getLogger(__name__)

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

def load_val(data_dir: str, preprocessor, limit: int | None,
             cache_dir: str | None = None) -> dict[str, Any]:
    """The val split decoded once (or read from the feature cache): images, captions, zero-shot
    tasks and each image's labels. One record per photo: a photo with five captions would stand
    five times among the candidates, so its twins would tie with it in image retrieval (R@1 = R@5)
    and its other captions would count as misses in text retrieval."""
    from pipeline.clip.feature_cache import cached_split  # the data layer (pyarrow): not needed by the recipe
    from pipeline.data.evalsets import load_zero_shot_tasks, zero_shot_label
    from pipeline.data.loading import load_split_arrays

    tasks = load_zero_shot_tasks(data_dir)
    arrays, metas = load_split_arrays(data_dir, "val", preprocessor, limit=limit, decode=cache_dir is None,
                                      one_per_group=True)
    if cache_dir is not None:
        arrays = cached_split(cache_dir, data_dir, "val", limit, one_per_group=True)
    labels = {task: [zero_shot_label(m, task) for m in metas] for task in tasks}
    return {"tasks": tasks, "images": arrays["image"], "texts": arrays["text"], "labels": labels,
            "preprocessor": preprocessor}


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

def shuffled_batches(data: dict[str, torch.Tensor], batch_size: int, seed: int):
    """One epoch of in-memory data in a seeded random order, in full batches."""
    order = torch.randperm(len(data["text"]), generator=torch.Generator().manual_seed(seed))
    device = data["text"].device
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size].to(device)
        yield {key: value[idx] for key, value in data.items()}

def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked, or by default on GPU; None: full fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None

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
                            autocast_dtype_for(train_params.precision, device))
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
