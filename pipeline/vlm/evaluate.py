"""QA evaluation (paper Tab 3 shape): exact match after normalisation and SBERT similarity to
the reference answer, per question type, on held-out images; for the subject question also
whether the colour and the shape are each named.

"Above chance" is measured, not assumed: chance is the exact-match rate the same answers would
get on the images in a random order (so a model that always says the commonest answer is at
chance), and a one-sided binomial test gives the p-value of the observed hits against it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest
from tqdm import tqdm

from pipeline.vlm.model import FeatureEdit, VisionLanguageModel
from pipeline.vlm.questions import normalise


def sbert_similarity(answers: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Cosine similarity of SBERT (all-MiniLM-L6-v2) embeddings, pairwise by position."""
    from pipeline.vocab import sbert_embeddings

    a = sbert_embeddings([x or " " for x in answers])
    b = sbert_embeddings(list(references))
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def answer_all(vlm: VisionLanguageModel, images: torch.Tensor, rows: Sequence[dict[str, Any]], batch_size: int,
               max_new_tokens: int, edits: Sequence[FeatureEdit | None] | None = None, desc: str = "answering",
               features: torch.Tensor | None = None) -> list[str]:
    """Answers for rows of {image, question}, batched; ``edits`` gives one edit per batch.
    ``features``: the images' sparse features (:func:`encode_images`), so the encoder is not run."""
    out = []
    starts = range(0, len(rows), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", mininterval=5)):
        chunk = rows[start : start + batch_size]
        picked = [r["image"] for r in chunk]
        visual = features[picked] if features is not None else vlm.sparse_features(images[picked])
        out += vlm.answer_features(visual, [r["question"] for r in chunk], edits[b] if edits else None, max_new_tokens)
    return out


def encode_images(vlm: VisionLanguageModel, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N, V, F]: every image's sparse features, a batch at a time, for :func:`answer_all`."""
    return torch.cat([vlm.sparse_features(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])


def chance_exact(answers: Sequence[str], references: Sequence[str]) -> float:
    """Expected exact-match rate of these answers given to the images in a random order:
    sum over answers a of P(answer = a) * P(reference = a)."""
    answered = Counter(normalise(a) for a in answers)
    expected = Counter(normalise(r) for r in references)
    return sum(n * expected[a] for a, n in answered.items()) / (len(answers) * len(references))


def p_above(hits: int, n: int, chance: float) -> float:
    """One-sided binomial p-value of ``hits`` in ``n`` trials when each succeeds with ``chance``."""
    if n == 0:
        return 1.0
    return float(binomtest(hits, n, min(max(chance, 1e-12), 1.0), alternative="greater").pvalue)


def qa_metrics(answers: Sequence[str], examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per question type: exact match, its chance level and p-value, SBERT similarity, n; subject
    also colour/shape named."""
    similarity = sbert_similarity(answers, [e["answer"] for e in examples])
    out: dict[str, float] = {}
    for qtype in sorted({e["type"] for e in examples}):
        idx = [i for i, e in enumerate(examples) if e["type"] == qtype]
        exact = [normalise(answers[i]) == normalise(examples[i]["answer"]) for i in idx]
        out[f"{qtype}.exact"] = float(np.mean(exact))
        out[f"{qtype}.chance"] = chance_exact([answers[i] for i in idx], [examples[i]["answer"] for i in idx])
        out[f"{qtype}.p_above_chance"] = p_above(sum(exact), len(idx), out[f"{qtype}.chance"])
        out[f"{qtype}.sbert"] = float(np.mean(similarity[idx]))
        out[f"{qtype}.n"] = len(idx)
        if qtype == "subject" and all(len(examples[i]["answer"].split()) == 2 for i in idx):
            # the generated data's "<colour> <shape>" answers (captioned photos answer one noun)
            for j, part in enumerate(("colour", "shape")):
                out[f"subject.{part}_named"] = float(np.mean(
                    [examples[i]["answer"].split()[j] in normalise(answers[i]).split() for i in idx]))
    return out
