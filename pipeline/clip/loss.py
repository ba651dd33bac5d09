"""The training objective: open_clip's contrastive loss (or :class:`.tiled_loss.TiledClipLoss`,
the same loss in memory independent of the global batch), plus L1 for the L1 ablation.

``ClipLoss(local_loss=True, gather_with_grad=True)`` is what open_clip's maintainers recommend at
scale: each worker scores its local rows against the gathered columns, and gradients flow back
through the gather, so N workers reproduce the gradients of one process on the whole batch
(``tests/test_model_loss.py`` proves it on 2 gloo workers). Its cost is the gather, which is what
the tiled loss removes (:mod:`.tiled_loss`).
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss
from torch import nn

from pipeline.clip.model import l1_penalty
from pipeline.clip.tiled_loss import TiledClipLoss
from pipeline.config import ModelParams

LOSSES = ("clip", "tiled")


class SparseClipObjective(nn.Module):
    """Contrastive loss on normalised sparse embeddings; for ``activation: l1``, plus L1.

    ``loss`` picks the contrastive term: ``"clip"`` is open_clip's ``ClipLoss``,
    ``"tiled"`` is :class:`TiledClipLoss` (same value and gradients, memory independent
    of the global batch). ``sparse_transport_density`` only applies to ``"tiled"``.
    """

    def __init__(
        self,
        params: ModelParams,
        rank: int = 0,
        world_size: int = 1,
        loss: str = "clip",
        sparse_transport_density: float | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss = {loss!r}: expected one of {', '.join(LOSSES)}")
        common = {
            "local_loss": True,
            "gather_with_grad": True,
            "cache_labels": True,
            "rank": rank,
            "world_size": world_size,
        }
        if loss == "tiled":
            self.contrastive = TiledClipLoss(
                **common, sparse_transport_density=sparse_transport_density
            )
        else:
            self.contrastive = ClipLoss(**common)
        active = params.activation == "l1" and params.expansion
        self.l1_lambda = params.l1_lambda if active else 0.0

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = outputs["image_features"], outputs["text_features"]
        losses = {
            "contrastive_loss": self.contrastive(image, text, outputs["logit_scale"])
        }
        if self.l1_lambda:
            losses["l1_loss"] = self.l1_lambda * l1_penalty(image, text)
        losses["loss"] = sum(losses.values())
        return losses
