"""Reading the activation store: one model's extracted sets (identifying columns + CSR
activations) and the reference encoder's embeddings aligned to them.

The extract and reference stages write these folders (:mod:`.extract`, :mod:`.reference`, in the
layout of :mod:`.sparse_io`); metrics, the SAE baseline and the atlas read them through here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from pipeline.activations.sparse_io import read_activations, read_reference


class ActivationSet:
    """The extracted sets of one model: identifying columns plus CSR activations, by name."""

    def __init__(self, act_dir: str | Path):
        self.dir = Path(act_dir)
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no extraction in {self.dir} (run the extract stage)")
        self.manifest = json.loads(manifest.read_text())
        self.width = self.manifest["width"]

    def has(self, name: str) -> bool:
        return name in self.manifest["rows"]

    def load(self, name: str) -> tuple[pa.Table, sp.csr_matrix]:
        return read_activations(self.dir / name, self.width)

    @property
    def zero_shot_tasks(self) -> dict[str, dict]:
        """Each labelled task's spec (its ``classes``), as the extraction wrote it."""
        return self.manifest.get("zero_shot_tasks", {})


def aligned_reference(meta: pa.Table, reference_dir: str | Path) -> np.ndarray:
    """The reference encoder's embeddings of the rows of ``meta``, in its order."""
    keys, embeddings = read_reference(reference_dir)
    position = {key: i for i, key in enumerate(keys)}
    missing = [k for k in meta.column("key").to_pylist() if k not in position]
    if missing:
        raise ValueError(f"{len(missing)} images have no reference embedding (e.g. {missing[0]}): "
                         "rerun the reference stage with the same extract.splits")
    return embeddings[[position[k] for k in meta.column("key").to_pylist()]]
