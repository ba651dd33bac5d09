"""The one place where metric inputs become the shapes the metrics compute on.

Activations arrive as dense arrays (small runs, tests) or as ``scipy.sparse`` matrices (cluster
scale: n = 1.2M rows by F = 55,296 features). Every metric converts them here to canonical CSR
and then works on the stored non-zeros only, so nothing ever densifies an n x F matrix.

The big metrics walk the rows a block at a time; :func:`map_blocks` runs those blocks on threads
inside :func:`block_threads` (the sparse and BLAS kernels release the GIL). The blocks are the
same whatever the thread count and their results are combined in block order, so a metric gives
the same bits on 1 thread or 64.
"""

from __future__ import annotations

import contextvars
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

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
    """[F] ``positive_column_sums(unit_sparse_rows(matrix))`` without building the whole unit-row
    matrix: rows are taken a block of about ``_NNZ_PER_CHUNK`` stored entries at a time."""
    out = np.zeros(matrix.shape[1])
    for rows in row_blocks_by_nnz(matrix.indptr, _NNZ_PER_CHUNK):
        out += positive_column_sums(unit_sparse_rows(matrix[rows]))
    return out


def row_blocks_by_nnz(indptr: np.ndarray, budget: int) -> Iterator[slice]:
    """Consecutive row slices of a CSR matrix holding about ``budget`` stored entries each (at
    least one row): bounded working memory however the non-zeros spread over the rows."""
    n, start = len(indptr) - 1, 0
    while start < n:
        stop = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(n, max(start + 1, stop))
        yield slice(start, stop)
        start = stop


def unit_sparse_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its L2 norm (all-zero rows stay zero), on the stored non-zeros only."""
    norms = np.sqrt(np.bincount(np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr)),
                                weights=matrix.data ** 2, minlength=matrix.shape[0]))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return matrix.multiply(scale[:, None]).tocsr()


def unit_rows(embeddings, keep_zero_rows: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32 or wider), so dot products are cosine similarities.

    A zero row has no direction and therefore no cosine similarity: it is an error, not a 0,
    unless the caller handles such rows itself (``keep_zero_rows``: they stay zero).
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n x d), got shape {x.shape}")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        if not keep_zero_rows:
            raise ValueError("embeddings contain an all-zero row; cosine similarity is undefined for it")
        norms = np.where(norms > 0, norms, 1)
    return x / norms


def row_blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``size`` rows covering range(n): bounded working memory."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


_THREADS = contextvars.ContextVar("block_threads", default=1)
T = TypeVar("T")
B = TypeVar("B")


@contextmanager
def block_threads(threads: int | None) -> Iterator[int]:
    """Inside, :func:`map_blocks` (called from this thread) uses ``threads`` threads; None: one
    per core. Outside, and in the blocks themselves, work stays on the calling thread."""
    count = (os.cpu_count() or 1) if threads is None else threads
    if count < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    token = _THREADS.set(count)
    try:
        yield count
    finally:
        _THREADS.reset(token)


def map_blocks(fn: Callable[[B], T], blocks: Iterable[B]) -> Iterator[T]:
    """``fn(block)`` for every block, yielded in block order, on :func:`block_threads`' threads.

    At most as many blocks as threads are in flight beyond the one being consumed, so a caller
    that folds the results as they come (a sum of partial products) holds a few of them, not all.
    """
    threads = _THREADS.get()
    if threads <= 1:
        yield from map(fn, blocks)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="metric-block") as pool:
        pending = deque()
        for block in blocks:
            pending.append(pool.submit(fn, block))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
