"""Spatial-token rows of an activation set as per-image grids, and the grid's geometry against
object boxes: what heatmaps, the pointing game and the segmentation probe share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # a type only: the metrics that use this geometry install without pyarrow
    import pyarrow as pa


def token_grids(meta: pa.Table, activations: sp.csr_matrix) -> dict[str, sp.csr_matrix]:
    """Per image key, its [T, F] token activations in token order (the tokens set's rows)."""
    keys = np.asarray(meta.column("key").to_pylist(), dtype=object)
    tokens = np.asarray(meta.column("token").to_pylist(), dtype=np.int64)
    order = np.lexsort((tokens, keys))
    keys, activations = keys[order], activations[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return {str(keys[s]): activations[s:e] for s, e in zip(starts, ends)}


def heatmap(grid: sp.csr_matrix, feature: int) -> np.ndarray:
    """One feature's activation over the square patch grid, [side, side]."""
    column = np.asarray(grid[:, feature].todense(), dtype=np.float32).ravel()
    side = math.isqrt(column.size)
    if side * side != column.size:
        raise ValueError(f"{column.size} tokens do not form a square patch grid")
    return column.reshape(side, side)


def token_centres(side: int, width: float, height: float) -> np.ndarray:
    """[side*side, 2] pixel (x, y) centres of the patch grid, row-major as ViT orders tokens."""
    row, col = np.divmod(np.arange(side * side), side)
    return np.stack([(col + 0.5) * width / side, (row + 0.5) * height / side], axis=1)


def inside_boxes(points: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """[n] whether each (x, y) point lies in any [x0, y0, x1, y1] box."""
    hit = np.zeros(len(points), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        hit |= (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
    return hit
