"""Where in the image a feature fires (supplementary Fig 1), and a number for it.

A ViT's spatial tokens each pass through the sparse head (:meth:`SparseCLIP.encode_image_tokens`),
so a feature's activation per token, on the patch grid, is a heatmap. The paper says Sparse-Avg
(trained on the mean of token activations) localises better than CLS pooling, but imprecisely;
on the embedded data every object's box is known, so the **pointing game** measures it: for each
object, take the feature its concept word activates most in the text tower, find the hottest
token, and score a hit when that token's centre lies inside a box of an object with the concept.
Chance is the fraction of the grid those boxes cover.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

FAMILIES = ("shape", "colour")


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


def _inside(points: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """[n] whether each (x, y) point lies in any [x0, y0, x1, y1] box."""
    hit = np.zeros(len(points), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        hit |= (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
    return hit


def pointing_trials(grids: Mapping[str, sp.csr_matrix], truths: Mapping[str, dict[str, Any]],
                    concept_features: Mapping[str, int], families: Sequence[str] = FAMILIES) -> list[dict]:
    """One trial per (image, concept present in it): the concept's feature, its hottest token,
    whether that token is inside a box of the concept, and the chance of a random token being so."""
    trials = []
    for key, grid in grids.items():
        truth = truths.get(key)
        if not truth or not truth.get("objects"):
            continue
        side = math.isqrt(grid.shape[0])
        size = truth.get("image_size", 1)
        centres = token_centres(side, size, size)
        for family in families:
            for concept in sorted({o[family] for o in truth["objects"]}):
                if concept not in concept_features:
                    continue
                feature = concept_features[concept]
                boxes = [o["bbox"] for o in truth["objects"] if o[family] == concept]
                heat = heatmap(grid, feature).ravel()
                target = _inside(centres, boxes)
                hottest = int(np.argmax(heat))
                trials.append({"key": key, "family": family, "concept": concept, "feature": feature,
                               "token": hottest, "silent": bool(heat.max() <= 0),
                               "hit": bool(heat.max() > 0 and target[hottest]), "chance": float(target.mean())})
    return trials


def pointing_game(trials: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy (hits / trials; a feature silent on every token is a miss) and chance, overall
    and per concept family."""
    out: dict[str, float] = {}
    for family in [None, *sorted({t["family"] for t in trials})]:
        chosen = [t for t in trials if family is None or t["family"] == family]
        prefix = "" if family is None else f"{family}."
        out[f"{prefix}accuracy"] = float(np.mean([t["hit"] for t in chosen])) if chosen else float("nan")
        out[f"{prefix}chance"] = float(np.mean([t["chance"] for t in chosen])) if chosen else float("nan")
        out[f"{prefix}trials"] = len(chosen)
        out[f"{prefix}silent"] = int(sum(t["silent"] for t in chosen))
    return out
