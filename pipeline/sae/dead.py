"""Dead features: tracking them, and the two standard ways to bring them back.

A feature is *dead* once it has not fired (code > 0) on any of the last ``dead_after_tokens``
training rows. Under TopK/BatchTopK a feature that never wins the top-k gets no gradient at all
and stays dead for good; under ReLU+L1 the penalty keeps pushing it down. Hence:

* :func:`auxk_loss` (Gao et al. 2024, top-k kinds): the dead features' own top ``aux_k``
  activations must reconstruct the main model's residual, which hands them a gradient toward
  what the live features miss. Weighted 1/32 in the total loss.
* :func:`resample_dead` (Bricken et al. 2023, ReLU kind): re-initialise each dead feature
  toward an input that the model currently reconstructs badly, and reset its Adam state.
"""

from __future__ import annotations

import torch

from .model import SparseAutoencoder


@torch.no_grad()
def update_firing(model: SparseAutoencoder, z: torch.Tensor) -> None:
    """Advance ``tokens_since_fired`` by one batch of codes: reset where a feature fired."""
    model.tokens_since_fired += z.shape[0]
    model.tokens_since_fired[(z > 0).any(dim=0)] = 0


def dead_mask(model: SparseAutoencoder, dead_after_tokens: int) -> torch.Tensor:
    """[width] bool: features silent for at least ``dead_after_tokens`` training rows."""
    return model.tokens_since_fired >= dead_after_tokens


def auxk_loss(
    model: SparseAutoencoder,
    pre: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
) -> torch.Tensor:
    """Squared error (summed over dims, mean over rows, the main loss's units) of reconstructing
    ``residual`` (x_n - x_hat_n, detached here) from the top ``min(aux_k, n_dead)`` ReLU'd
    pre-activations of the dead features, decoded without bias. Exactly 0 when none is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_k <= 0:
        return pre.new_zeros(())
    dead_acts = torch.relu(pre[:, dead])
    top = torch.topk(dead_acts, min(aux_k, n_dead), dim=1, sorted=False)
    codes = torch.zeros_like(dead_acts).scatter(1, top.indices, top.values)
    estimate = codes @ model.W_dec[dead]
    return (estimate - residual.detach()).pow(2).sum(dim=1).mean()


@torch.no_grad()
def resample_dead(
    model: SparseAutoencoder,
    x_n: torch.Tensor,
    dead: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialise dead features from a batch of *normalised* inputs; returns how many.

    Rows are drawn with probability proportional to their squared reconstruction error; a dead
    feature's decoder row becomes the unit direction of (x - b_dec), its encoder column the same
    direction times ``encoder_scale`` x the mean norm of live encoder columns, its bias 0, and
    its Adam moments are zeroed so stale statistics do not fling it away.
    """
    index = dead.nonzero().squeeze(1)
    if index.numel() == 0:
        return 0
    error = (model.decode_normalized(model.sparsify(model.pre_activations(x_n))) - x_n).pow(2).sum(dim=1)
    weights = error.square().float()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights.cpu(), index.numel(), replacement=True, generator=generator)
    directions = x_n[picks.to(x_n.device)] - model.b_dec
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)

    live = ~dead
    enc_norm = model.W_enc[:, live].norm(dim=0).mean() if live.any() else model.W_enc.new_tensor(1.0)
    model.W_dec[index] = directions
    model.W_enc[:, index] = directions.t() * (encoder_scale * enc_norm)
    model.b_enc[index] = 0.0
    model.tokens_since_fired[index] = 0
    if optimizer is not None:
        _reset_adam(optimizer, model.W_dec, (index,))
        _reset_adam(optimizer, model.W_enc, (slice(None), index))
        _reset_adam(optimizer, model.b_enc, (index,))
    return index.numel()


def _reset_adam(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: tuple) -> None:
    """Zero Adam's moment estimates of ``param[where]`` (no-op before the first step)."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][where] = 0.0
