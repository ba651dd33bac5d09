"""Training an SAE on a stream of activations: :func:`train_sae` and its :class:`SAETrainConfig`.

Defaults follow the supplementary's recipe (BatchTopK, K = 30, expansion 32) with Bussmann et
al.'s optimiser (Adam, lr 4e-4, betas (0.9, 0.999)) and Gao et al.'s AuxK (k_aux 512, weight
1/32). One step: normalise the batch, encode, loss = squared error per row (+ L1 for ``relu``,
+ AuxK for the top-k kinds), drop the decoder gradient's radial part, Adam step, renormalise
decoder rows, update the BatchTopK threshold and the dead-feature counters.

Given the seed, a run is deterministic: weights come from a seeded generator, shuffling from
another, and nothing reads the global RNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .dead import auxk_loss, dead_mask, resample_dead, update_firing
from .model import KINDS, SparseAutoencoder, geometric_median

Batches = torch.Tensor | np.ndarray | Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class SAETrainConfig:
    """Hyperparameters of one SAE run.

    ``width`` wins over ``expansion`` (width = expansion * d_in). ``steps`` wins over ``epochs``
    (the data is cycled until ``steps``; a one-shot iterator ends the run when exhausted).
    ``dead_after_tokens`` defaults to Bussmann et al.'s 5 batches of 4096; ``resample_every``
    (steps, 0 = never) only applies to ``relu``.
    """

    kind: str = "batchtopk"
    width: int | None = None
    expansion: int = 32
    k: int = 30
    l1_lambda: float = 0.0
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 4096
    aux_k: int = 512
    aux_coef: float = 1 / 32
    dead_after_tokens: int = 5 * 4096
    resample_every: int = 25_000
    threshold_momentum: float = 0.01
    b_dec_init: str = "mean"
    log_every: int = 100
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.b_dec_init not in ("mean", "median"):
            raise ValueError(f"b_dec_init must be 'mean' or 'median', got {self.b_dec_init!r}")
        if self.batch_size < 1 or self.log_every < 1 or self.epochs < 1:
            raise ValueError("batch_size, log_every and epochs must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def width_for(self, d_in: int) -> int:
        """The dictionary size for inputs of dimension ``d_in``."""
        return self.width if self.width is not None else self.expansion * d_in


def train_sae(batches: Batches, params: SAETrainConfig) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE; returns (model in eval mode, history).

    ``batches`` is one of: an (n x d) tensor or array (shuffled into ``batch_size`` rows each
    epoch with the seed), an iterable of (m x d) tensors, or a callable returning such an
    iterable per epoch; tensors of any m are regrouped into ``batch_size`` rows. ``normalize``'s
    scale and ``b_dec`` are initialised from the first batch. History: one dict per
    ``log_every`` steps and at the last step (step, tokens, loss, mse, aux, l1, fvu, l0,
    dead_fraction), all measured on that step's batch.
    """
    device = torch.device(params.device)
    init_gen = torch.Generator().manual_seed(params.seed)
    data_gen = torch.Generator().manual_seed(params.seed + 1)
    stream = _batch_stream(batches, params, data_gen)
    first = next(stream, None)
    if first is None:
        raise ValueError("no training data")
    stream = itertools.chain([first], stream)

    d_in = first.shape[1]
    model = SparseAutoencoder(
        d_in, params.width_for(d_in), params.kind, params.k, params.l1_lambda, generator=init_gen
    ).to(device)
    _init_from_data(model, first.to(device, torch.float32), params.b_dec_init)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, betas=params.betas, fused=True)

    model.train()
    history: list[dict] = []
    tokens = 0
    for step, batch in enumerate(stream, start=1):
        x_n = model.normalize(batch.to(device, torch.float32))
        parts = train_step(model, optimizer, x_n, params)
        tokens += x_n.shape[0]
        if params.kind == "relu" and params.resample_every and step % params.resample_every == 0:
            resample_dead(model, x_n, dead_mask(model, params.dead_after_tokens), optimizer, init_gen)
        last = params.steps is not None and step >= params.steps
        if step % params.log_every == 0 or last:
            history.append(_log(model, x_n, parts, step, tokens, params))
        if last:
            break
    else:
        if not history or history[-1]["step"] != step:
            history.append(_log(model, x_n, parts, step, tokens, params))
    return model.eval(), history


def train_step(model: SparseAutoencoder, optimizer, x_n: torch.Tensor, params: SAETrainConfig) -> dict:
    """One optimiser step on a *normalised* batch (model in train mode), the whole recipe
    except resampling; returns the detached loss parts and the batch's codes and
    reconstruction (``loss, mse, aux, l1, z, x_hat``). For custom loops around a model."""
    pre = model.pre_activations(x_n)
    z = model.sparsify(pre)
    x_hat = model.decode_normalized(z)
    mse = (x_hat - x_n).pow(2).sum(dim=1).mean()
    l1 = model.sparsity_penalty(z)
    aux = x_n.new_zeros(())
    if model.kind != "relu" and params.aux_coef > 0:
        aux = auxk_loss(model, pre, x_n - x_hat, dead_mask(model, params.dead_after_tokens), params.aux_k)
    loss = mse + l1 + params.aux_coef * aux

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.remove_parallel_decoder_grad()
    optimizer.step()
    model.normalize_decoder()
    model.update_threshold(z, params.threshold_momentum)
    update_firing(model, z)
    return {
        "loss": loss.detach(),
        "mse": mse.detach(),
        "aux": aux.detach(),
        "l1": l1.detach(),
        "z": z.detach(),
        "x_hat": x_hat.detach(),
    }


@torch.no_grad()
def _log(model, x_n, parts, step: int, tokens: int, params: SAETrainConfig) -> dict:
    """One history record from a step's batch (FVU against that batch's own mean)."""
    variance = (x_n - x_n.mean(dim=0)).pow(2).sum()
    return {
        "step": step,
        "tokens": tokens,
        "loss": float(parts["loss"]),
        "mse": float(parts["mse"]),
        "aux": float(parts["aux"]),
        "l1": float(parts["l1"]),
        "fvu": float((parts["x_hat"] - x_n).pow(2).sum() / variance.clamp_min(1e-12)),
        "l0": float((parts["z"] > 0).sum(dim=1).float().mean()),
        "dead_fraction": float(dead_mask(model, params.dead_after_tokens).float().mean()),
    }


@torch.no_grad()
def _init_from_data(model: SparseAutoencoder, x: torch.Tensor, b_dec_init: str) -> None:
    """Fit the input scale, then put ``b_dec`` at the (normalised) data's mean or median."""
    model.fit_normalization(x)
    x_n = model.normalize(x)
    model.b_dec.copy_(geometric_median(x_n) if b_dec_init == "median" else x_n.mean(dim=0))


def _batch_stream(
    batches: Batches, params: SAETrainConfig, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """All training batches of the run, epoch after epoch (``steps`` decides when to stop)."""
    epochs = itertools.count() if params.steps is not None else range(params.epochs)
    if isinstance(batches, (torch.Tensor, np.ndarray)):
        data = torch.as_tensor(batches)
        if data.ndim != 2:
            raise ValueError(f"training data must be 2-D (n x d), got shape {tuple(data.shape)}")
        for _ in epochs:
            order = torch.randperm(data.shape[0], generator=generator)
            for start in range(0, data.shape[0], params.batch_size):
                yield data[order[start : start + params.batch_size]]
        return
    one_shot = isinstance(batches, Iterator)
    for _ in epochs:
        source = batches() if callable(batches) else batches
        produced = False
        for batch in _regroup(source, params.batch_size):
            produced = True
            yield batch
        if one_shot or not produced:
            return


def _regroup(source: Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of (m x d) chunks into (batch_size x d) batches, the last one partial."""
    pending: list[torch.Tensor] = []
    count = 0
    for chunk in source:
        chunk = torch.as_tensor(chunk)
        pending.append(chunk)
        count += chunk.shape[0]
        while count >= batch_size:
            merged = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield merged[:batch_size]
            pending, count = [merged[batch_size:]], count - batch_size
    if count:
        yield torch.cat(pending)
