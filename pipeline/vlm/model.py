"""The VLM: frozen Sparse CLIP image encoder -> sparse features (pooled embedding: one visual
token; or every spatial token) -> 2-layer MLP adapter -> the language model's input embeddings.

A prompt is ``<user prefix> [visual tokens] <question> <assistant prefix>`` in the LM's chat
format; training scores only the answer tokens. Steering edits the sparse features between the
encoder and the adapter (:func:`edit_features`), which is what makes them steerable by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.clip.model import SparseCLIP

IGNORE = -100
USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"


@dataclass
class FeatureEdit:
    """Per example: feature indices to zero, indices to set to ``strength`` ([B, K] each)."""

    suppress: torch.Tensor | None = None
    boost: torch.Tensor | None = None
    strength: float = 0.0


def edit_features(features: torch.Tensor, edit: FeatureEdit | None) -> torch.Tensor:
    """Features [B, V, F] with the edit applied to every visual token of each example."""
    if edit is None:
        return features
    out = features.clone()
    for indices, value in ((edit.suppress, 0.0), (edit.boost, edit.strength)):
        if indices is not None and indices.numel():
            index = indices.to(out.device)[:, None, :].expand(-1, out.shape[1], -1)
            out.scatter_(-1, index, torch.full(index.shape, value, dtype=out.dtype, device=out.device))
    return out


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder: SparseCLIP, lm, tokenizer, features: str = "pooled", hidden: int = 1024):
        super().__init__()
        if features not in ("pooled", "tokens"):
            raise ValueError(f"vlm.features must be pooled or tokens, got {features!r}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.lm, self.tokenizer, self.features = lm, tokenizer, features
        self.adapter = nn.Sequential(nn.Linear(encoder.width, hidden), nn.GELU(),
                                     nn.Linear(hidden, lm.config.hidden_size))
        self.end_id = tokenizer.convert_tokens_to_ids(END)

    # ---------------------------------------------------------------- inputs

    @torch.no_grad()
    def sparse_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, V, F]: the pooled sparse embedding (V = 1) or every spatial token's. ``images``: pixels
        [B, 3, H, W], or a locked image tower's cached outputs (the feature cache's rows: [B, C], or
        a trainable unit's input [B, C, h, w]; the encoder's trainable part runs on them, as in training)."""
        if not self.encoder.holds_pixels(images):
            if self.features == "tokens":
                raise ValueError("vlm.features tokens reads the image tower's last feature map; the feature "
                                 "cache's rows stop before it: give pixels")
            return self.encoder.encode_image_features(images)[:, None, :]
        if self.features == "tokens":
            return self.encoder.encode_image_tokens(images)[1]
        return self.encoder.encode_image(images)[:, None, :]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        device = self.adapter[0].weight.device
        return self.lm.get_input_embeddings()(torch.as_tensor(list(ids), dtype=torch.long, device=device))

    def sequences(self, visual: torch.Tensor, questions: Sequence[str], answers: Sequence[str] | None = None):
        """Per example (embeddings [T, d], labels [T]): prompt around the visual tokens, then the
        answer and end token when given (only those are labelled)."""
        prefix = self._ids(USER)
        prompts = [self._ids(f"{question}{END}\n{ASSISTANT}") for question in questions]
        replies = [self._ids(a) + [self.end_id] for a in answers] if answers is not None else [[] for _ in questions]
        # One embedding lookup for the whole batch: when stage 2 trains the LM, each lookup's backward
        # writes a dense vocabulary-sized gradient (49k x 576 for SmolLM2), and one lookup per piece
        # (48 per batch of 16) was most of a whole-LM step.
        pieces = [prefix, *prompts, *replies]
        embedded = self._embed_ids([t for ids in pieces for t in ids]).split([len(ids) for ids in pieces])
        n = len(questions)
        out = []
        for i in range(n):
            parts = (embedded[0], visual[i], embedded[1 + i], embedded[1 + n + i])
            labels = [IGNORE] * (len(prefix) + visual.shape[1] + len(prompts[i])) + replies[i]
            out.append((torch.cat(parts), torch.as_tensor(labels, device=visual.device)))
        return out

    def visual_tokens(self, images: torch.Tensor, edit: FeatureEdit | None = None) -> torch.Tensor:
        return self.adapter(edit_features(self.sparse_features(images), edit))

    # ---------------------------------------------------------------- training

    def loss(self, images: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens (right-padded batch)."""
        rows = self.sequences(self.visual_tokens(images), questions, answers)
        length = max(len(labels) for _, labels in rows)
        embeds = torch.stack([F.pad(e, (0, 0, 0, length - len(e))) for e, _ in rows])
        labels = torch.stack([F.pad(lab, (0, length - len(lab)), value=IGNORE) for _, lab in rows])
        mask = torch.stack([F.pad(torch.ones(len(lab), device=lab.device), (0, length - len(lab))) for _, lab in rows])
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != IGNORE  # project only answer positions onto the vocabulary
        logits = self.lm.lm_head(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets[scored])

    # ---------------------------------------------------------------- answering

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str], edit: FeatureEdit | None = None,
               max_new_tokens: int = 8) -> list[str]:
        """Greedy answers, batched with left padding and a KV cache."""
        return self.answer_features(self.sparse_features(images), questions, edit, max_new_tokens)

    @torch.no_grad()
    def answer_features(self, features: torch.Tensor, questions: Sequence[str], edit: FeatureEdit | None = None,
                        max_new_tokens: int = 8) -> list[str]:
        """:meth:`answer` from the images' :meth:`sparse_features` [B, V, F]: the encoder is frozen,
        so a caller that asks about the same images many times (steering's grid of edits) encodes
        them once."""
        rows = self.sequences(self.adapter(edit_features(features, edit)), questions)
        length = max(len(e) for e, _ in rows)
        embeds = torch.stack([F.pad(e, (0, 0, length - len(e), 0)) for e, _ in rows])
        mask = torch.stack([F.pad(torch.ones(len(e), device=e.device, dtype=torch.long), (length - len(e), 0))
                            for e, _ in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # only the last position's logits are read: projecting every prompt position onto the
        # 49k-word vocabulary was most of the prefill's cost
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1)
        tokens, done = [], torch.zeros(len(rows), dtype=torch.bool, device=mask.device)
        for _ in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)
            tokens.append(next_ids)
            done |= next_ids == self.end_id
            if done.all():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.lm(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                          past_key_values=out.past_key_values, use_cache=True)
        generated = torch.stack(tokens, dim=1).tolist()
        return [self.tokenizer.decode(ids[: ids.index(self.end_id)] if self.end_id in ids else ids,
                                      skip_special_tokens=True).strip() for ids in generated]
