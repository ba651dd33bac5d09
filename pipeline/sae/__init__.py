"""Post-hoc sparse autoencoders: the baseline that Sparse CLIP is compared against.

Train an SAE on a frozen model's dense activations, then ask how well its sparse codes
reconstruct them. Pure PyTorch/numpy: no Ray, DVC or MLflow; runs on CPU or CUDA.

=====================  ==========================================  ===============================
module                 contents                                    reproduces / follows
=====================  ==========================================  ===============================
:mod:`.model`          SparseAutoencoder (kinds batchtopk, topk,   BatchTopK (Bussmann et al.
                       relu), geometric_median                     2024), TopK (Gao et al. 2024),
                                                                   ReLU+L1 (Anthropic)
:mod:`.dead`           update_firing, dead_mask, auxk_loss,        AuxK (Gao et al.); resampling
                       resample_dead                               (Bricken et al. 2023)
:mod:`.train`          SAETrainConfig, train_sae,                  supplementary setup: BatchTopK,
                       train_step                                  K = 30, expansion 32
:mod:`.metrics`        fvu, cosine_similarity, l0, dead_fraction,  supplementary Table 6: FVU, L0,
                       outlier_mask, reconstruction_report         CS on all and outlier tokens
:mod:`.synthetic`      sparse_dictionary_data, atom_recovery       beyond the paper: recovery of
                                                                   a planted dictionary
=====================  ==========================================  ===============================

Conventions: the model stores an input scale (mean squared norm -> d_in) and applies it inside
``encode``/``decode``/``forward``, which take and return raw activations; decoder rows have
unit norm; codes are dense tensors, non-negative, "fires" meaning > 0. Outlier tokens are those
whose L2 norm exceeds tau (the supplementary's per-model threshold, or a norm quantile).

    model, history = train_sae(x, SAETrainConfig(k=30, expansion=32, steps=10_000))
    reconstruction_report(model, x_val)  # {"all.fvu": ..., "outlier.fvu": ..., ...}
"""

from .dead import auxk_loss, dead_mask, resample_dead, update_firing
from .metrics import (
    cosine_similarity,
    dead_fraction,
    fvu,
    l0,
    outlier_mask,
    reconstruction_report,
)
from .model import KINDS, SparseAutoencoder, geometric_median
from .synthetic import atom_recovery, sparse_dictionary_data
from .train import SAETrainConfig, train_sae, train_step

__all__ = [
    "KINDS",
    "SAETrainConfig",
    "SparseAutoencoder",
    "atom_recovery",
    "auxk_loss",
    "cosine_similarity",
    "dead_fraction",
    "dead_mask",
    "fvu",
    "geometric_median",
    "l0",
    "outlier_mask",
    "reconstruction_report",
    "resample_dead",
    "sparse_dictionary_data",
    "train_sae",
    "train_step",
    "update_firing",
]
