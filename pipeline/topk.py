"""Keeping the k strongest entries and zeroing the rest: the one rule behind the TopK head
(:class:`pipeline.clip.heads.TopK`, Gao et al. 2024) and the TopK / BatchTopK SAEs
(:mod:`pipeline.sae.model`, Bussmann et al. 2024), on dense tensors.

Its form on stored non-zeros (CSR, for top-k zero-shot over 1.2M x 55k activations) is
:func:`pipeline.metrics.topk.keep_topk`; the tests hold the two to the same answer.
"""

from __future__ import annotations

import torch


def keep_top(values: torch.Tensor, k: int, dim: int = -1, scores: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` with all but the k entries along ``dim`` that rank highest by ``scores``
    (default: the values themselves) zeroed; same shape, differentiable through the kept values."""
    k = min(k, values.shape[dim])
    indices = torch.topk(values if scores is None else scores, k, dim=dim, sorted=False).indices
    return torch.zeros_like(values).scatter(dim, indices, values.gather(dim, indices))


def keep_top_of_all(acts: torch.Tensor, k: int, hint: float = 0.0) -> torch.Tensor:
    """``acts`` (>= 0) with all but its k largest entries, over the whole tensor, zeroed
    (BatchTopK's batch-level rule).

    Exact, and faster than a top-k over every entry (on CPU that top-k was half of an SAE
    training step): when ``hint`` > 0 and at least k entries exceed it, the k-th largest is
    among those few, so the top-k runs on them alone. BatchTopK passes half its running
    threshold (the smallest kept activation, averaged), which the k-th largest rarely falls
    below; when it does, the full top-k is the fallback. Entries tied with the k-th largest are
    all kept (ties between positive floats do not happen in practice; zeros stay zero either way)."""
    flat = acts.reshape(-1)
    if k >= flat.numel():
        return acts
    pool = flat
    if hint > 0:
        candidates = flat[flat > hint]
        if candidates.numel() >= k:
            pool = candidates
    kth = torch.topk(pool.detach(), k, sorted=False).values.min()
    return acts * (acts >= kth) if kth > 0 else acts
