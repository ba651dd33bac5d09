"""Sparse activations on disk: one Parquet row per input, its non-zero feature indices and values.

Bytes grow with the number of non-zeros, not with the width, so 1.2M images x 55,296 features
at L0 ~ 400 cost about 4 GB rather than 265 GB dense. A dense model's embeddings use the same
layout (every index present), so every downstream reader handles both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

if TYPE_CHECKING:  # readers (metrics, atlas, report) never import torch for this module
    import torch

WIDTH_KEY = b"sparseclip.width"


def sparse_rows(features: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """[B, F] tensor -> per row (int32 indices, float32 values) of its non-zero entries."""
    dense = features.detach().float().cpu().numpy()
    indices = [np.flatnonzero(row).astype(np.int32) for row in dense]
    return indices, [row[idx].astype(np.float32) for row, idx in zip(dense, indices)]


def activation_table(columns: dict[str, Sequence], indices: list[np.ndarray], values: list[np.ndarray],
                     width: int) -> pa.Table:
    """A Parquet-ready table: the given identifying columns plus ``indices`` and ``values``."""
    arrays = {name: pa.array(list(data)) for name, data in columns.items()}
    arrays["indices"] = pa.array(indices, type=pa.list_(pa.int32()))
    arrays["values"] = pa.array(values, type=pa.list_(pa.float32()))
    table = pa.table(arrays)
    return table.replace_schema_metadata({WIDTH_KEY: str(width).encode()})


def read_table(path: str | Path, sort_by: str | None = "key") -> pa.Table:
    """All Parquet files under ``path`` (a file or a folder Ray wrote), in a deterministic order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no activations at {path} (run the extract stage)")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    table = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if table is None:
        raise FileNotFoundError(f"no parquet files in {path}")
    return table.sort_by(sort_by) if sort_by and sort_by in table.column_names else table


def to_csr(table: pa.Table, width: int | None = None) -> sp.csr_matrix:
    """The ``indices``/``values`` columns as an (n x F) CSR matrix, without densifying."""
    width = width or table_width(table)
    indices = table.column("indices").combine_chunks()
    values = table.column("values").combine_chunks()
    indptr = np.asarray(indices.offsets, dtype=np.int64)
    return sp.csr_matrix(
        (np.asarray(values.flatten(), dtype=np.float32), np.asarray(indices.flatten(), dtype=np.int32), indptr),
        shape=(table.num_rows, width),
    )


def table_width(table: pa.Table) -> int:
    metadata = table.schema.metadata or {}
    if WIDTH_KEY in metadata:
        return int(metadata[WIDTH_KEY])
    raise ValueError("activation table carries no width metadata; pass width explicitly")


def read_activations(path: str | Path, width: int | None = None) -> tuple[pa.Table, sp.csr_matrix]:
    """(the identifying columns, the activations as CSR) of one extracted set, sorted by key."""
    table = read_table(path)
    return table.drop_columns(["indices", "values"]), to_csr(table, width)


def read_reference(out_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """(keys, [n, d] embeddings) sorted by key, to align with the sparse activations."""
    table = read_table(Path(out_dir) / "images")
    return table.column("key").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def evolution_set(tag: str, name: str) -> str:
    """The stored set that training snapshot ``tag`` encoded (``images``, ``texts``, ``vocab``)."""
    return f"evo_{tag}_{name}"
