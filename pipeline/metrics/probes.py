"""Beyond zero-shot (the reviewers' ask): what a linear read-out of the frozen features recovers.

Zero-shot accuracy mixes two questions: does the image side carry a concept, and does the text
tower name it where the images are. Two probes answer the first alone, for dense and sparse
models alike:

- **concept probes**: per concept family, a logistic regression on the unit-norm image features
  of the val images, scored on the test images, beside the majority class's share (chance). A
  family the probe reads and zero-shot misses is in the image features and lost between towers;
- **segmentation probe**: per spatial token of the token sample (the features the head gives each
  position, as for heatmaps), foreground -- its centre inside an object's box, the generator's
  ground truth -- against background, fitted on half the images and scored by AUROC on the other
  half (0.5: no better than a guess; a token grid of a few cells can only say so much).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline.activations.tokens import inside_boxes, token_centres

PROBE_C = 10.0  # weak L2: the probe should read what is there, not be regularised toward chance


def _unit_rows(rows: sp.csr_matrix | np.ndarray) -> np.ndarray:
    dense = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)


def _logistic():
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=PROBE_C)


def concept_probes(features: sp.csr_matrix | np.ndarray, splits: Sequence[str], tasks: Sequence[str],
                   label_of: Callable[[str], Sequence[str | None]], fit_split: str = "val",
                   score_split: str = "test") -> dict[str, dict[str, float]]:
    """Per task: probe accuracy on ``score_split`` after fitting on ``fit_split``, the majority
    class's share there (what a constant answer scores) and both row counts. A task with fewer
    than two classes among the fitted rows is left out (nothing to tell apart)."""
    rows = _unit_rows(features)
    splits = np.asarray(splits)
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        labels = np.asarray(label_of(task), dtype=object)
        known = np.array([label is not None for label in labels], dtype=bool)
        fit, score = np.flatnonzero((splits == fit_split) & known), np.flatnonzero((splits == score_split) & known)
        if len(set(labels[fit])) < 2 or not len(score):
            continue
        probe = _logistic().fit(rows[fit], labels[fit].astype(str))
        truth = labels[score].astype(str)
        _, score_counts = np.unique(truth, return_counts=True)
        out[task] = {"accuracy": float(probe.score(rows[score], truth)), "chance": float(score_counts.max() / len(truth)),
                     "n_fit": len(fit), "n_scored": len(score)}
    return out


def foreground(side: int, truth: Mapping[str, Any]) -> np.ndarray:
    """[side*side] whether each token's centre lies inside an object's box (row-major grid)."""
    size = truth.get("image_size", 1)
    return inside_boxes(token_centres(side, size, size), [o["bbox"] for o in truth.get("objects", [])])


def segmentation_probe(grids: Mapping[str, sp.csr_matrix], truths: Mapping[str, Mapping[str, Any]]
                       ) -> dict[str, float] | None:
    """Foreground-vs-background AUROC of a token probe fitted on the first half of the images (in
    key order) and scored on the second half; None when there is too little to fit or score."""
    from sklearn.metrics import roc_auc_score

    keys = sorted(k for k in grids if truths.get(k, {}).get("objects"))
    halves = keys[: len(keys) // 2], keys[len(keys) // 2:]
    parts = []
    for half in halves:
        rows = [grids[k] for k in half]
        labels = [foreground(math.isqrt(g.shape[0]), truths[k]) for k, g in zip(half, rows)]
        if not rows:
            return None
        parts.append((_unit_rows(sp.vstack(rows).tocsr()), np.concatenate(labels)))
    (x_fit, y_fit), (x_score, y_score) = parts
    if len(set(y_fit)) < 2 or len(set(y_score)) < 2:
        return None
    probe = _logistic().fit(x_fit, y_fit)
    return {"auroc": float(roc_auc_score(y_score, probe.decision_function(x_score))),
            "foreground_share": float(y_score.mean()), "tokens_per_image": int(grids[keys[0]].shape[0]),
            "images": len(keys)}
