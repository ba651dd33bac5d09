"""Keeping only each input's strongest features (supplementary §2, Fig 2): zero-shot ImageNet
with the top-1 feature already reaches 45%, and the top 32 nearly match all features.

The rule is :func:`pipeline.topk.keep_top`'s (the TopK head's and the SAEs'), here on stored
non-zeros so it never densifies an n x F matrix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._arrays import as_csr


def keep_topk(activations, k: int) -> sp.csr_matrix:
    """(n x F) CSR in which each row keeps only its k largest activations (ties go to the lower
    feature index); rows with at most k non-zeros are unchanged. O(nnz log nnz)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    matrix = as_csr(activations)
    n = matrix.shape[0]
    rows = np.repeat(np.arange(n), np.diff(matrix.indptr))
    ranked = np.lexsort((matrix.indices, -matrix.data, rows))  # by row, then value desc, then index
    place_in_row = np.arange(matrix.nnz) - matrix.indptr[rows[ranked]]
    kept = np.sort(ranked[place_in_row < k])  # back to CSR order: row-major, columns sorted
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[kept], minlength=n))])
    return sp.csr_matrix((matrix.data[kept], matrix.indices[kept], indptr), shape=matrix.shape)
