"""Zero-shot classification as CLIP defines it: each class is the normalised mean of its prompt
embeddings; an image is assigned the class of highest cosine similarity. The same code serves
dense and sparse models, since both return embeddings of one width for images and text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(encode_text, tokenize, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, F] normalised class embeddings; ``encode_text`` maps token ids to (unnormalised) features."""
    rows = []
    for name in classes:
        prompts = tokenize([template.format(name) for template in templates])
        rows.append(F.normalize(F.normalize(encode_text(prompts), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def topk_accuracy(image_features: torch.Tensor, classifier: torch.Tensor, labels: Sequence[int],
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of cosine-similarity classification; k above the class count is capped."""
    logits = F.normalize(image_features, dim=-1) @ classifier.T
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    ranked = logits.topk(min(max(ks), classifier.shape[0]), dim=-1).indices
    hits = ranked == target[:, None]
    return {f"top{k}": hits[:, :k].any(-1).float().mean().item() for k in ks}
