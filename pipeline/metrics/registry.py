"""The metrics of one model's activations, by name: one table that the metrics stage
(:mod:`.evaluate`) computes from and the scale benchmark (``benchmarks/metrics_scale.py``) times,
so the benchmark measures the very calls the stage makes, with the stage's parameters.

Each entry takes the arrays (:class:`Activations`) and :class:`~pipeline.config.MetricsParams`
(tau, n_min, the top-k cuts) and returns what the stage records: a dict of numbers, or the
per-feature array a figure plots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline import metrics as M
from pipeline.config import MetricsParams
from pipeline.metrics._arrays import unit_sparse_rows
from pipeline.metrics.zeroshot import accuracy_from_scores, cosine_scores, zero_shot_accuracy


@dataclass
class Activations:
    """One model's activations and what the metrics compare them with: ``reference`` holds the
    reference encoder's embedding of each image row; ``classifier`` [C, F] and ``labels`` one
    labelled task's class embeddings and each image row's class."""

    images: sp.csr_matrix | np.ndarray
    texts: sp.csr_matrix | np.ndarray | None = None
    reference: np.ndarray | None = None
    classifier: np.ndarray | None = None
    labels: Sequence[int] | None = None


Metric = Callable[[Activations, MetricsParams], Any]
REGISTRY: dict[str, Metric] = {}


def register(name: str) -> Callable[[Metric], Metric]:
    def add(fn: Metric) -> Metric:
        REGISTRY[name] = fn
        return fn

    return add


def compute(name: str, x: Activations, params: MetricsParams) -> Any:
    if name not in REGISTRY:
        raise KeyError(f"unknown metric {name!r}: known are {', '.join(REGISTRY)}")
    return REGISTRY[name](x, params)


@register("sparsity")
def sparsity(x: Activations, params: MetricsParams) -> dict[str, float]:
    """Table 3a's L0, active and dead features of the image rows."""
    return M.sparsity_summary(x.images, n_min=params.n_min)


@register("clarity")
def clarity(x: Activations, params: MetricsParams) -> dict[str, float]:
    """Eq. 2's Clarity against the reference embeddings, its dataset baseline, and the share of
    features active enough (tau, n_min) to be scored."""
    return {
        "clarity": M.clarity(x.images, x.reference, tau=params.clarity_tau, n_min=params.n_min),
        "clarity_baseline": M.dataset_baseline(x.reference),
        "active_pct_clarity": 100 * M.active_fraction(x.images, tau=params.clarity_tau, n_min=params.n_min),
    }


@register("modality")
def modality(x: Activations, params: MetricsParams) -> np.ndarray:
    """Per feature: its image share of the mass over unit-L2 rows (Fig 3b's x axis)."""
    return M.modality_scores(x.images, x.texts)


@register("feature_density")
def feature_density(x: Activations, params: MetricsParams) -> np.ndarray:
    """Per feature: the share of image and text rows it fires on (Fig 3b's y axis)."""
    return M.feature_density(sp.vstack([x.images, x.texts]).tocsr())


@register("zeroshot")
def zeroshot(x: Activations, params: MetricsParams) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy with every feature, and the task's chance level."""
    return zero_shot_accuracy(x.images, x.classifier, x.labels)


def topk_cut_scores(cut: str, images, classifier: np.ndarray, k: int) -> np.ndarray:
    """Cosine scores with only the top-k features of each class label (``labels_topk``) or of
    each image (``images_topk``)."""
    if cut == "labels_topk":
        return cosine_scores(images, unit_sparse_rows(M.keep_topk(classifier, k)))  # sparse: O(matches)
    return cosine_scores(M.keep_topk(images, k), classifier)


def _topk_cut(cut: str) -> Metric:
    def cut_accuracy(x: Activations, params: MetricsParams) -> dict[int, float]:
        return {k: accuracy_from_scores(topk_cut_scores(cut, x.images, x.classifier, k), x.labels)["top1"]
                for k in params.topk}

    cut_accuracy.__doc__ = f"Supplementary Fig 2: top-1 accuracy per k of ``metrics.topk`` ({cut})."
    return cut_accuracy


for _cut in ("labels_topk", "images_topk"):
    register(_cut)(_topk_cut(_cut))
