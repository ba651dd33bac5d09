"""How well an SAE reconstructs, on all tokens and on high-norm outlier tokens: the columns of
the information-scope supplementary's Table 6 (FVU, L0, cosine similarity; A = all tokens,
O = outliers), plus the dead-feature share.

Plain functions: numpy arrays or torch tensors in, floats out (computed in float64). FVU is
scale-invariant, so it reads the same in raw or normalised space; "fires" means code > 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.metrics import sparsity


def _np(a) -> np.ndarray:
    """float64 2-D numpy view of an array or tensor."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D (n x d) array, got shape {a.shape}")
    return a


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2.

    0 for a perfect reconstruction, 1 for predicting the per-dimension mean; NaN when x has no
    variance (a single row, or identical rows).
    """
    x, x_hat = _np(x), _np(x_hat)
    total = np.square(x - x.mean(axis=0)).sum()
    return float(np.square(x - x_hat).sum() / total) if total > 0 else math.nan


def cosine_similarity(x, x_hat, eps: float = 1e-12) -> float:
    """Mean over rows of cos(x_i, x_hat_i); a zero row counts as 0."""
    x, x_hat = _np(x), _np(x_hat)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    return float(np.mean((x * x_hat).sum(axis=1) / np.maximum(norms, eps)))


def l0(z) -> float:
    """Mean number of firing features per row of SAE codes (tensor or array), as
    :func:`pipeline.metrics.sparsity.l0` counts it."""
    return sparsity.l0(_np(z))


def dead_fraction(z) -> float:
    """Share of features that fire on no row of the evaluated set (:mod:`pipeline.metrics.sparsity`)."""
    return sparsity.dead_fraction(_np(z))


def outlier_mask(x, quantile: float = 0.99, threshold: float | None = None) -> np.ndarray:
    """[n] bool: high-norm ("outlier") tokens, ||x_i||_2 > tau.

    The supplementary picks tau per model by eye from the token-norm distribution (its Table 5:
    100 to 1000 on raw activations); pass that as ``threshold``. Without one, tau is the
    ``quantile`` of this set's norms, i.e. the top 1 - quantile of tokens by norm.
    """
    norms = np.linalg.norm(_np(x), axis=1)
    tau = threshold if threshold is not None else np.quantile(norms, quantile)
    return norms > tau


@torch.no_grad()
def _row_stats(model, x: np.ndarray, mask: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The model's reconstruction of x in eval mode, chunk by chunk, reduced on the fly so
    memory stays O(n + width): per row squared error, cosine and L0; per feature whether it
    fired on any row (``fires_all``) and on any masked row (``fires_outlier``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sq_err, cos, counts = [], [], []
    fires_all = torch.zeros(model.width, dtype=torch.bool, device=device)
    fires_outlier = torch.zeros_like(fires_all)
    for start in range(0, x.shape[0], batch_size):
        chunk = torch.as_tensor(x[start : start + batch_size], device=device, dtype=torch.float32)
        x_hat, z = model(chunk)
        x_hat, chunk, fired = x_hat.double(), chunk.double(), z > 0
        sq_err.append((chunk - x_hat).pow(2).sum(dim=1).cpu())
        norms = chunk.norm(dim=1) * x_hat.norm(dim=1)
        cos.append(((chunk * x_hat).sum(dim=1) / norms.clamp_min(1e-12)).cpu())
        counts.append(fired.sum(dim=1).cpu())
        fires_all |= fired.any(dim=0)
        rows = torch.as_tensor(mask[start : start + batch_size], device=device)
        fires_outlier |= fired[rows].any(dim=0)
    model.train(was_training)
    stats = {
        name: torch.cat(parts).numpy() for name, parts in (("sq_err", sq_err), ("cos", cos), ("l0", counts))
    }
    return stats | {"fires_all": fires_all.cpu().numpy(), "fires_outlier": fires_outlier.cpu().numpy()}


def reconstruction_report(
    model, x, quantile: float = 0.99, threshold: float | None = None, batch_size: int = 4096
) -> dict[str, float]:
    """Table 6 for one SAE on raw inputs x: ``{all,outlier}.{fvu,cosine,l0,dead_fraction,n}``.

    Runs the model in eval mode in chunks (no n x width array is kept). Outliers as in
    :func:`outlier_mask`; FVU on the outlier rows is against their own mean. Every outlier
    value is NaN (and ``outlier.n`` 0) if no row passes the threshold.
    """
    x = _np(x)
    mask = outlier_mask(x, quantile, threshold)
    stats = _row_stats(model, x, mask, batch_size)
    report = {}
    for prefix, rows in (("all", np.ones_like(mask)), ("outlier", mask)):
        n = int(rows.sum())
        total = np.square(x[rows] - x[rows].mean(axis=0)).sum() if n else 0.0
        report[f"{prefix}.fvu"] = float(stats["sq_err"][rows].sum() / total) if total > 0 else math.nan
        report[f"{prefix}.cosine"] = float(stats["cos"][rows].mean()) if n else math.nan
        report[f"{prefix}.l0"] = float(stats["l0"][rows].mean()) if n else math.nan
        report[f"{prefix}.dead_fraction"] = sparsity.dead_share(stats[f"fires_{prefix}"]) if n else math.nan
        report[f"{prefix}.n"] = float(n)
    return report
