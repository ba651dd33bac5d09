"""Open-vocabulary tagging from captions: a zero-shot score for photos without class labels.

Real photos come with captions, not classes. For each of the most frequent caption nouns (a tag),
every test image gets the model's zero-shot score (the cosine of its embedding with the tag
word's text embedding) and a label (whether any of its captions uses the word or its plural);
the tag's AUROC says how well the score ranks the photos that show it above those that do not.
0.5 is chance whatever the tag's frequency, so tags of different frequencies average fairly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp


def frequent_tags(image_words: Sequence[set[str]], candidates: Iterable[str], n: int, min_images: int) -> list[str]:
    """The ``n`` candidate words that the most images' captions use (at least ``min_images``, and
    never every image: a tag needs negatives), most frequent first, ties by the word."""
    candidates = set(candidates)
    counts = Counter(w for words in image_words for w in words if w in candidates)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [w for w, c in ranked if min_images <= c < len(image_words)][:n]


def tagging_auroc(images: sp.spmatrix | np.ndarray, tag_embeddings: sp.spmatrix | np.ndarray,
                  labels: np.ndarray) -> np.ndarray:
    """Per tag, the AUROC of the cosine between each image and the tag's text embedding against
    the labels ([n_images, n_tags] booleans); NaN for a tag with one class only. An all-zero
    embedding scores 0 with everything (ties, counted half by the AUROC)."""
    scores = _unit(images) @ _unit(tag_embeddings).T
    scores = scores.toarray() if sp.issparse(scores) else np.asarray(scores)
    return np.array([_auroc(scores[:, j], labels[:, j]) for j in range(labels.shape[1])])


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The Mann-Whitney AUROC with ties counted half (sklearn's roc_auc_score, without sklearn)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _unit(rows: sp.spmatrix | np.ndarray):
    if sp.issparse(rows):
        norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1))).ravel()
        return sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ rows
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
