"""The training objective: open_clip's own contrastive loss, plus the L1 ablation's penalty.

``ClipLoss(local_loss=True, gather_with_grad=True)`` is what open_clip's maintainers recommend
at scale: each worker scores its local rows against the gathered columns, and gradients flow
back through the gather, so N workers reproduce the gradients of one process on the whole
batch (``tests/test_loss.py`` proves it on 2 gloo workers) with O(local x global) logits.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss
from torch import nn

from pipeline.config import ModelParams
from pipeline.model import l1_penalty


class SparseClipObjective(nn.Module):
    """Contrastive loss on normalised sparse embeddings; for ``activation: l1``, plus lambda * L1."""

    def __init__(self, params: ModelParams, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.contrastive = ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
        )
        self.l1_lambda = params.l1_lambda if params.activation == "l1" and params.expansion else 0.0

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = outputs["image_features"], outputs["text_features"]
        losses = {"contrastive_loss": self.contrastive(image, text, outputs["logit_scale"])}
        if self.l1_lambda:
            losses["l1_loss"] = self.l1_lambda * l1_penalty(image, text)
        losses["loss"] = sum(losses.values())
        return losses
