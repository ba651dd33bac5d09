"""A ground truth for SAEs: data built from a known sparse dictionary, and the check that an SAE
found it. If training cannot recover planted atoms here, its numbers on CLIP mean little.
"""

from __future__ import annotations

import numpy as np
import torch


def sparse_dictionary_data(
    n: int, d: int, n_atoms: int, k_active: int, seed: int = 0, noise: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(x [n x d], atoms [n_atoms x d]) float32: each row is a non-negative combination of
    ``k_active`` distinct atoms drawn uniformly, with coefficients uniform in [0.5, 1.5] (bounded
    away from 0 so every active atom is visible), plus isotropic Gaussian noise of std ``noise``
    per dimension. Atoms are random unit vectors."""
    if not 1 <= k_active <= n_atoms:
        raise ValueError(f"k_active must be in [1, n_atoms={n_atoms}], got {k_active}")
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    active = np.argpartition(rng.random((n, n_atoms)), k_active - 1, axis=1)[:, :k_active]
    coefficients = np.zeros((n, n_atoms))
    np.put_along_axis(coefficients, active, rng.uniform(0.5, 1.5, size=(n, k_active)), axis=1)
    x = coefficients @ atoms + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), atoms.astype(np.float32)


def atom_recovery(decoder_rows, atoms) -> float:
    """Mean over true atoms of the best cosine similarity to any learned decoder row ("mean max
    cosine"): 1 when every atom has an exact copy in the dictionary; ~0.3-0.5 for random rows
    in low dimension. Takes numpy arrays or tensors, ([width x d], [n_atoms x d])."""
    learned, truth = (_unit_rows(a) for a in (decoder_rows, atoms))
    return float((truth @ learned.T).max(axis=1).mean())


def _unit_rows(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
