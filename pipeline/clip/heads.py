"""The sparse head of each tower: ``Linear(embed_dim, embed_dim * expansion)`` and its activation
(ReLU, the paper's; ``none``, ``topk`` and ``l1`` for the ablations of Fig 2b); the identity for
the dense baseline (``expansion = 0``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelParams
from pipeline.topk import keep_top


class TopK(nn.Module):
    """Keep each row's k largest pre-activations (ReLU'd), zero the rest (Gao et al., 2024).

    ``centred`` (the default) picks the k by each pre-activation minus its feature's mean, and keeps
    the values as they are: Gao et al.'s SAE centres its input by a pre-encoder bias for the same
    reason. Raw selection collapses on a CLIP head: the component every embedding shares picks the
    same k features for every input, only those get gradient, and training never leaves them
    (measured on the embedded data: one support for all inputs, at any bias start; centred, 200
    distinct supports of 200 and a falling loss). The mean is the batch's in training, tracked
    with ``momentum`` as BatchNorm tracks its statistics, and the tracked one in eval, so an
    input's features never depend on what else is in its batch at inference."""

    def __init__(self, k: int, width: int, centred: bool = True, momentum: float = 0.1):
        super().__init__()
        self.k, self.centred, self.momentum = k, centred, momentum
        if centred:
            self.register_buffer("running_mean", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x - self._feature_mean(x) if self.centred else x
        return keep_top(F.relu(x), self.k, dim=-1, scores=scores)

    def _feature_mean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.running_mean.to(x.dtype)
        batch_mean = x.detach().reshape(-1, x.shape[-1]).float().mean(0)
        self.running_mean.lerp_(batch_mean, self.momentum)
        return batch_mean.to(x.dtype)


def make_activation(params: ModelParams, width: int) -> nn.Module:
    if params.expansion == 0 or params.activation == "none":
        return nn.Identity()
    if params.activation == "topk":
        return TopK(params.topk, width, centred=params.topk_selection == "centred")
    return nn.ReLU()  # "relu", and "l1" which adds its penalty in the loss


class SparseHead(nn.Module):
    """Linear(embed_dim -> embed_dim * expansion) + activation; identity for the dense baseline."""

    def __init__(self, embed_dim: int, params: ModelParams):
        super().__init__()
        self.width = embed_dim * params.expansion if params.expansion else embed_dim
        self.linear = nn.Linear(embed_dim, self.width) if params.expansion else nn.Identity()
        if params.expansion and params.head_bias_init is not None:
            nn.init.constant_(self.linear.bias, params.head_bias_init)  # draws no random numbers
        self.activation = make_activation(params, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))
