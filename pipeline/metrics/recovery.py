"""Ground-truth concept recovery (beyond the paper): on the project's synthetic data every
image's concepts are known, so one can ask directly whether some feature detects each concept,
and whether features are monosemantic, instead of inferring it from Clarity.

A feature's AUROC for a concept is the Mann-Whitney statistic of its activations on images
with vs without the concept. It is computed for all (feature, concept) pairs from the stored
non-zeros: within a feature all zero rows tie, so they share one average rank, and only the
non-zeros need sorting — O(nnz log nnz + nnz x C), never an n x F dense matrix.

AUROC asks a feature to fire on (nearly) every image of its concept. A sparse model can instead
split a concept over several features that each fire on a part of its images and on little else
(measured: the long run's Sparse+ has four "red" features, each firing on half of the red images
and on nothing else, at AUROC ~0.75). Precision tells the two codes apart: a feature is *precise*
when the images it fires on share one concept, and a concept is covered by its precise features
when together they fire on nearly all of its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._arrays import as_csr


def _binary_labels(labels, n: int) -> np.ndarray:
    """(n x C) float 0/1 labels, checked against the number of activation rows."""
    y = np.asarray(labels)
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"labels must be ({n} x C), got shape {y.shape}")
    return (y != 0).astype(np.float64)


def _ranks(columns: sp.csc_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based, ties averaged) among all n values of each column, implicit zeros
    included: ([nnz] ranks of the stored values, aligned with ``columns.data``; [F] the one
    rank all zeros of a column share)."""
    n, width = columns.shape
    column_of = np.repeat(np.arange(width), np.diff(columns.indptr))
    zeros = n - np.diff(columns.indptr)
    zero_rank = np.bincount(column_of[columns.data < 0], minlength=width) + (zeros + 1) / 2.0

    order = np.lexsort((columns.data, column_of))
    values, cols = columns.data[order], column_of[order]
    group_start = np.ones(columns.nnz, dtype=bool)
    group_start[1:] = (cols[1:] != cols[:-1]) | (values[1:] != values[:-1])
    starts = np.flatnonzero(group_start)
    sizes = np.diff(np.append(starts, columns.nnz))
    smaller_nonzeros = starts - columns.indptr[cols[starts]]
    group_rank = smaller_nonzeros + (sizes + 1) / 2.0
    nonzero_ranks = np.empty(columns.nnz)
    nonzero_ranks[order] = np.repeat(group_rank, sizes) + np.where(values > 0, zeros[cols], 0)
    return nonzero_ranks, zero_rank


def auroc_matrix(activations, labels) -> np.ndarray:
    """[F, C] AUROC of each feature's activation as a detector of each concept.

    ``labels`` is an (n x C) binary array. Ties get average ranks (so a feature that is 0
    everywhere scores 0.5); a concept present on all rows or on none has no AUROC (NaN).
    """
    columns = as_csr(activations).tocsc()
    n, width = columns.shape
    y = _binary_labels(labels, n)
    nonzero_ranks, zero_rank = _ranks(columns)
    # The CSC arrays of (n x F) read as CSR are its (F x n) transpose: one row per feature.
    ranks = sp.csr_matrix((nonzero_ranks, columns.indices, columns.indptr), shape=(width, n))
    fires = sp.csr_matrix((np.ones(columns.nnz), columns.indices, columns.indptr), shape=(width, n))
    positives = y.sum(axis=0)
    rank_sums = ranks @ y + zero_rank[:, None] * (positives - fires @ y)
    u = rank_sums - positives * (positives + 1) / 2.0
    pairs = positives * (n - positives)
    return np.divide(u, pairs, out=np.full(u.shape, np.nan), where=pairs > 0)


def best_f1(scores_column, labels_column) -> tuple[float, float]:
    """Best F1 of the rule "score >= threshold" over thresholds at the unique score values,
    and that threshold (the highest one on ties). With no positive labels F1 is 0."""
    scores = np.asarray(scores_column, dtype=np.float64).ravel()
    truth = np.asarray(labels_column).ravel() != 0
    if scores.size == 0 or scores.shape != truth.shape:
        raise ValueError(f"need equally long, non-empty scores and labels, got {scores.shape} and {truth.shape}")
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    true_pos = np.cumsum(hits)
    predicted = np.arange(1, scores.size + 1)
    last_of_value = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    f1 = 2.0 * true_pos[last_of_value] / (predicted[last_of_value] + truth.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(ranked[last_of_value[best]])


def _finite_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass
class RecoveryReport:
    """How well the features recover known concepts.

    Per concept (arrays of length C): the feature with the best AUROC (-1 when the concept has
    no AUROC), that AUROC, and that feature's best F1 with its threshold. Summary: the means
    over concepts, the share of active features that are monosemantic (best concept AUROC
    >= ``mono_auroc`` and second-best < ``mono_auroc``), and concept coverage: the share of
    concepts that some single feature detects at that same bar (:meth:`coverage`).

    Precision (:func:`precise_features`): ``precise_fraction`` is the share of the features that
    fire on at least ``precise_min_images`` images of which at least ``mono_precision`` share a
    concept (a conjunction, "red" and "star", is precise for both); per concept, ``split_recall``
    is the share of its images on which any of its precise features fires, and the concept is
    covered by precise features (``split_coverage``) when that reaches ``mono_precision`` too. That
    is not a superset of single-feature coverage: a feature of high AUROC that also fires on other
    concepts' images is not precise.
    """

    concept_names: list[str]
    best_feature: np.ndarray
    best_auroc: np.ndarray
    best_f1: np.ndarray
    best_threshold: np.ndarray
    mean_best_auroc: float
    mean_best_f1: float
    monosemantic_fraction: float
    n_active_features: int
    mono_auroc: float
    precise_fraction: float
    n_eligible_features: int
    precise_per_concept: np.ndarray
    split_recall: np.ndarray
    mono_precision: float
    precise_min_images: int

    @property
    def covered(self) -> np.ndarray:
        """[C] whether some single feature detects the concept (best AUROC >= ``mono_auroc``)."""
        return np.nan_to_num(self.best_auroc, nan=0.0) >= self.mono_auroc

    def coverage(self) -> dict[str, float]:
        """Share of concepts covered, overall (``coverage``) and per family (``coverage_<family>``,
        the part of a "family:value" name before the colon), and the active features per covered
        concept: the model's width in use set against what it detects."""
        scored = ~np.isnan(self.best_auroc)
        out = {"coverage": float(self.covered[scored].mean()) if scored.any() else float("nan")}
        families = np.array([name.split(":", 1)[0] for name in self.concept_names])
        for family in dict.fromkeys(families[scored]):
            members = scored & (families == family)
            out[f"coverage_{family}"] = float(self.covered[members].mean())
        covered = int(self.covered.sum())
        out["active_per_covered_concept"] = self.n_active_features / covered if covered else float("nan")
        split = self.split_recall[scored] >= self.mono_precision
        out["split_coverage"] = float(split.mean()) if scored.any() else float("nan")
        return out

    def to_dict(self) -> dict:
        """Flat summary numbers plus a per-concept table (list of dicts), all plain Python
        (NaN stays NaN, as the metric loggers expect floats)."""
        return {
            "mean_best_auroc": self.mean_best_auroc,
            "mean_best_f1": self.mean_best_f1,
            "monosemantic_fraction": self.monosemantic_fraction,
            **self.coverage(),
            "n_active_features": self.n_active_features,
            "mono_auroc": self.mono_auroc,
            "precise_fraction": self.precise_fraction,
            "n_eligible_features": self.n_eligible_features,
            "mono_precision": self.mono_precision,
            "precise_min_images": self.precise_min_images,
            "concepts": [
                {"concept": name, "best_feature": int(feature), "auroc": float(auroc), "covered": bool(covered),
                 "f1": float(f1), "threshold": float(threshold), "precise_features": int(precise),
                 "split_recall": float(recall)}
                for name, feature, auroc, covered, f1, threshold, precise, recall in zip(
                    self.concept_names, self.best_feature, self.best_auroc, self.covered, self.best_f1,
                    self.best_threshold, self.precise_per_concept, self.split_recall)
            ],
        }


def _monosemantic(auroc: np.ndarray, active: np.ndarray, mono_auroc: float) -> float:
    """Share of active features selective for exactly one concept at the ``mono_auroc`` bar."""
    if not active.any():
        return float("nan")
    ranked = -np.sort(-np.nan_to_num(auroc[active], nan=-np.inf), axis=1)
    second = ranked[:, 1] if ranked.shape[1] > 1 else np.full(len(ranked), -np.inf)
    return float(((ranked[:, 0] >= mono_auroc) & (second < mono_auroc)).mean())


@dataclass
class PreciseFeatures:
    """What the features' firing patterns say about the concepts (see the module docstring)."""

    precision: np.ndarray  # [F, C] share of a feature's firing images that hold the concept
    eligible: np.ndarray  # [F] fires on at least ``min_images`` images
    precise: np.ndarray  # [F, C] eligible and precise for the concept
    split_recall: np.ndarray  # [C] share of the concept's images on which any precise feature fires (NaN: none)


def precise_features(activations, labels, min_precision: float = 0.9, min_images: int = 10) -> PreciseFeatures:
    """Per feature, the share of the images it fires on (activation > 0) that hold each concept;
    per concept, the recall of the union of its precise features: those with >= ``min_images``
    firing images of which >= ``min_precision`` hold it. A concept on at least that share of all
    images is never one a feature is precise for (any feature would be)."""
    fires = (as_csr(activations) > 0).astype(np.float64).tocsr()
    y = _binary_labels(labels, fires.shape[0])
    firing = np.asarray(fires.sum(axis=0)).ravel()
    share = np.asarray(fires.T @ y) / np.maximum(firing, 1)[:, None]
    eligible = firing >= min_images
    rare_enough = y.mean(axis=0) < min_precision
    precise = eligible[:, None] & (share >= min_precision) & rare_enough[None, :]
    reached = np.asarray(fires @ precise.astype(np.float64)) > 0
    positives = y.sum(axis=0)
    recall = np.divide((reached * y).sum(axis=0), positives, out=np.full(y.shape[1], np.nan), where=positives > 0)
    return PreciseFeatures(share, eligible, precise, recall)


def concept_recovery(activations, labels, concept_names: Sequence[str], mono_auroc: float = 0.9,
                     mono_precision: float = 0.9, min_images: int = 10) -> RecoveryReport:
    """Best detector feature per concept (AUROC, best F1), the monosemantic share of the
    active (ever non-zero) features, and the precise features; see :class:`RecoveryReport`."""
    columns = as_csr(activations).tocsc()
    y = _binary_labels(labels, columns.shape[0])
    names = list(concept_names)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} concept names for {y.shape[1]} label columns")
    auroc = auroc_matrix(columns, y)
    concepts = y.shape[1]
    best_feature = np.full(concepts, -1)
    best_auroc, best_f1s, thresholds = (np.full(concepts, np.nan) for _ in range(3))
    for c in range(concepts):
        if np.isnan(auroc[:, c]).all():
            continue
        feature = int(np.nanargmax(auroc[:, c]))
        best_feature[c], best_auroc[c] = feature, auroc[feature, c]
        best_f1s[c], thresholds[c] = best_f1(columns[:, feature].toarray(), y[:, c])
    active = np.diff(columns.indptr) > 0
    judged = precise_features(columns, y, mono_precision, min_images)
    eligible = int(judged.eligible.sum())
    return RecoveryReport(
        concept_names=names,
        best_feature=best_feature,
        best_auroc=best_auroc,
        best_f1=best_f1s,
        best_threshold=thresholds,
        mean_best_auroc=_finite_mean(best_auroc),
        mean_best_f1=_finite_mean(best_f1s),
        monosemantic_fraction=_monosemantic(auroc, active, mono_auroc),
        n_active_features=int(active.sum()),
        mono_auroc=float(mono_auroc),
        precise_fraction=float(judged.precise[judged.eligible].any(axis=1).mean()) if eligible else float("nan"),
        n_eligible_features=eligible,
        precise_per_concept=judged.precise.sum(axis=0),
        split_recall=judged.split_recall,
        mono_precision=float(mono_precision),
        precise_min_images=int(min_images),
    )
