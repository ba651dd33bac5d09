"""Evaluation metrics on arrays: plain functions, no I/O, testable alone.

Activations are (n x F) ``scipy.sparse`` matrices or dense arrays (every function takes both and
works on the stored non-zeros, never densifying n x F); embeddings are dense (n x d) arrays.

=====================  ==========================================  ===============================
module                 functions                                   reproduces
=====================  ==========================================  ===============================
:mod:`.sparsity`       l0, feature_counts, active_features,         Table 3a "L0" and "Active F%";
                       active_fraction, dead_fraction, density,     Fig 3b y-axis (feature_density)
                       feature_density, sparsity_summary
:mod:`.clarity`        clarity, dataset_baseline, c_score          Eq. 2 / Table 3a "Clarity" and its
                                                                   dataset baseline; supp. Fig 3
                                                                   (text C-score vs threshold)
:mod:`.modality`       modality_scores, modality_summary,          Fig 3b (and Fig 6): image-only /
                       plot_modality_density                       text-only / multimodal features
:mod:`.retrieval`      retrieval_recall, retrieval_ranks,          Table 2 retrieval: IR@1/5, TR@1/5;
                       recall_difference                           a model against a baseline, with
                                                                   a paired bootstrap interval
:mod:`.topk`           keep_topk                                  supp. Fig 2: zero-shot with only
                                                                   the top-k features per input
:mod:`.recovery`       auroc_matrix, best_f1, concept_recovery,    beyond the paper: recovery of
                       precise_features, RecoveryReport            the synthetic data's concepts
=====================  ==========================================  ===============================

Paper conventions: Clarity uses tau = 0.001, n_min = 2 and OpenAI CLIP image embeddings;
"Active F%" = 100 * active_fraction; a modality score is the image share of a feature's
mass over unit-L2 rows (1 image-only, 0 text-only).
"""

from .clarity import c_score, clarity, dataset_baseline
from .modality import modality_scores, modality_summary, plot_modality_density
from .recovery import RecoveryReport, auroc_matrix, best_f1, concept_recovery, precise_features
from .retrieval import recall_difference, retrieval_ranks, retrieval_recall
from .sparsity import (
    active_features,
    active_fraction,
    dead_fraction,
    density,
    feature_counts,
    feature_density,
    l0,
    sparsity_summary,
)
from .topk import keep_topk

__all__ = [
    "RecoveryReport",
    "active_features",
    "active_fraction",
    "auroc_matrix",
    "best_f1",
    "c_score",
    "clarity",
    "concept_recovery",
    "precise_features",
    "dataset_baseline",
    "dead_fraction",
    "density",
    "feature_counts",
    "feature_density",
    "keep_topk",
    "l0",
    "modality_scores",
    "modality_summary",
    "plot_modality_density",
    "recall_difference",
    "retrieval_ranks",
    "retrieval_recall",
    "sparsity_summary",
]
