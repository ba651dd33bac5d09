"""How sparse a representation is and how many of its features are used: the L0 and
"Active F%" columns of the paper's Table 3a, and the activation density axis of Fig 3b.

Activations are ReLU outputs, so "fires" means > 0 (or > tau); all counts run over stored
non-zeros, in O(nnz).
"""

from __future__ import annotations

import numpy as np

from ._arrays import as_csr, nnz_chunks, positive_column_max, positive_column_sums


def l0(activations) -> float:
    """Mean number of non-zero entries per row (the paper's L0)."""
    matrix = as_csr(activations)
    return l0_summary(matrix.nnz, matrix.shape[0], matrix.shape[1])["l0"]


def l0_summary(nonzeros: float, rows: int, width: int) -> dict[str, float]:
    """L0 from a tally: ``l0`` (non-zeros per row) and ``l0_pct`` (100 * l0 / width). The form a
    streaming count (the training window) reports without holding the activations."""
    mean = nonzeros / max(rows, 1)
    return {"l0": mean, "l0_pct": 100.0 * mean / width}


def feature_counts(activations, tau: float = 0.0) -> np.ndarray:
    """[F] int: number of rows on which each feature is > tau.

    tau must be >= 0: implicit zeros are never counted, which is only right if 0 does not pass.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    matrix = as_csr(activations)
    out = np.zeros(matrix.shape[1], dtype=np.int64)
    for part in nnz_chunks(matrix.nnz):  # chunk by chunk: no nnz-long mask or index copy
        out += np.bincount(matrix.indices[part][matrix.data[part] > tau], minlength=matrix.shape[1])
    return out


def active_features(activations, tau: float = 0.0, n_min: int = 2) -> np.ndarray:
    """[F] bool: features that are > tau on at least n_min rows (Clarity's F_active set)."""
    return feature_counts(activations, tau) >= n_min


def active_fraction(activations, tau: float = 0.0, n_min: int = 2) -> float:
    """Share of features that are active, in [0, 1]: the paper's "Active F%" divided by 100."""
    return float(active_features(activations, tau, n_min).mean())


def dead_fraction(activations) -> float:
    """Share of features that are never > 0 on any row."""
    return dead_share(feature_counts(activations))


def dead_share(firings) -> float:
    """Share of features that never fired, from a per-feature tally of firings ([F] counts or
    bools, however they were gathered: a CSR pass, a training window, an SAE's chunked eval)."""
    return float((np.asarray(firings) == 0).mean())


def density(activations) -> float:
    """Stored non-zeros over all entries, nnz / (n * F)."""
    matrix = as_csr(activations)
    return matrix.nnz / (matrix.shape[0] * matrix.shape[1])


def feature_density(activations) -> np.ndarray:
    """[F] magnitude-weighted firing frequency: mean over rows of a_i(x) / max_x a_i(x).

    A feature firing at full strength on every row scores 1, one firing weakly or rarely scores
    near 0; dead features score 0. This is the y-axis quantity of the paper's Fig 3b.
    """
    matrix = as_csr(activations)
    peak = positive_column_max(matrix)
    mean = positive_column_sums(matrix) / matrix.shape[0]
    return np.divide(mean, peak, out=np.zeros_like(mean), where=peak > 0)


def sparsity_summary(activations, tau: float = 0.0, n_min: int = 2) -> dict[str, float]:
    """The sparsity numbers a run reports: l0, l0_pct (100 * l0 / F), active_fraction,
    dead_fraction, density and width (F)."""
    matrix = as_csr(activations)
    width = matrix.shape[1]
    return {
        **l0_summary(matrix.nnz, matrix.shape[0], width),
        "active_fraction": active_fraction(matrix, tau, n_min),
        "dead_fraction": dead_fraction(matrix),
        "density": density(matrix),
        "width": float(width),
    }
