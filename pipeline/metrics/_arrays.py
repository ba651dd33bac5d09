"""The one place where metric inputs become the shapes the metrics compute on.

Activations arrive as dense arrays (small runs, tests) or as ``scipy.sparse`` matrices (cluster
scale: n = 1.2M rows by F = 55,296 features). Every metric converts them here to canonical CSR
and then works on the stored non-zeros only, so nothing ever densifies an n x F matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp


def as_csr(activations) -> sp.csr_matrix:
    """Canonical float CSR (sorted indices, no duplicates, no stored zeros) of an (n x F) input.

    Sparse inputs are shared, not copied, when already canonical; stored zeros are dropped
    because every count here ("non-zero", "fires") must mean a value that is actually non-zero.
    """
    if sp.issparse(activations):
        matrix = sp.csr_matrix(activations)
    else:
        dense = np.asarray(activations)
        if dense.ndim != 2:
            raise ValueError(f"activations must be 2-D (n x F), got shape {dense.shape}")
        matrix = sp.csr_matrix(dense)
    if not np.issubdtype(matrix.dtype, np.floating):
        matrix = matrix.astype(np.float64)
    if not matrix.has_canonical_format or (matrix.data == 0).any():
        matrix = matrix.copy()
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
    return matrix


_NNZ_PER_CHUNK = 1 << 22  # stored entries per pass of the column reductions: bounds their temporaries


def nnz_chunks(nnz: int, size: int = 0) -> Iterator[slice]:
    """Consecutive slices of range(nnz) of at most ``size`` stored entries (default
    ``_NNZ_PER_CHUNK``): the column reductions below run chunk by chunk, so their temporaries
    (float64 weights, intp indices) cost a chunk, not 16 bytes per non-zero of the whole matrix."""
    return row_blocks(nnz, size or _NNZ_PER_CHUNK)


def positive_column_sums(matrix: sp.csr_matrix) -> np.ndarray:
    """[F] sum over rows of max(a, 0): the activation mass of each feature, in O(nnz)."""
    out = np.zeros(matrix.shape[1])
    for part in nnz_chunks(matrix.nnz):
        out += np.bincount(matrix.indices[part], weights=np.maximum(matrix.data[part], 0.0),
                           minlength=matrix.shape[1])
    return out


def positive_column_max(matrix: sp.csr_matrix) -> np.ndarray:
    """[F] max over rows of max(a, 0) (0 for a feature that never fires), in O(nnz)."""
    out = np.zeros(matrix.shape[1])
    for part in nnz_chunks(matrix.nnz):
        np.maximum.at(out, matrix.indices[part], matrix.data[part])
    return out


def unit_positive_column_sums(matrix: sp.csr_matrix) -> np.ndarray:
    """[F] ``positive_column_sums(unit_sparse_rows(matrix))`` without building the unit-row matrix:
    rows are taken a block of about ``_NNZ_PER_CHUNK`` stored entries at a time."""
    out = np.zeros(matrix.shape[1])
    indptr, n, start = matrix.indptr, matrix.shape[0], 0
    while start < n:
        stop = min(n, max(start + 1, int(np.searchsorted(indptr, indptr[start] + _NNZ_PER_CHUNK, side="right")) - 1))
        lo, hi = int(indptr[start]), int(indptr[stop])
        local = np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1]))
        data = matrix.data[lo:hi]
        norms = np.sqrt(np.bincount(local, weights=data ** 2, minlength=stop - start))
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        out += np.bincount(matrix.indices[lo:hi], weights=np.maximum(data * scale[local], 0.0),
                           minlength=matrix.shape[1])
        start = stop
    return out


def unit_sparse_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its L2 norm (all-zero rows stay zero), on the stored non-zeros only."""
    norms = np.sqrt(np.bincount(np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr)),
                                weights=matrix.data ** 2, minlength=matrix.shape[0]))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return matrix.multiply(scale[:, None]).tocsr()


def unit_rows(embeddings) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32 or wider), so dot products are cosine similarities.

    A zero row has no direction and therefore no cosine similarity: it is an error, not a 0.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n x d), got shape {x.shape}")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("embeddings contain an all-zero row; cosine similarity is undefined for it")
    return x / norms


def row_blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``size`` rows covering range(n): bounded working memory."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
