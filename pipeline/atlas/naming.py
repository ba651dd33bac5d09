"""Concept naming by vocabulary (paper §3.2, Fig 4, 9): a feature is described by the words
whose *text* embedding activates it most and the images that activate it most; its name is the
top word. Because Sparse CLIP's features are shared by both towers, the text side names what
the image side detects, with no labels and no captioning model.

Everything works column-wise on CSR/CSC matrices, so 55,296 features x 1.2M images cost
O(nnz), never a dense matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp


def top_per_feature(activations: sp.spmatrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every column, the rows of its k largest positive activations, largest first.

    Returns ([F, k] row indices padded with -1, [F, k] values padded with 0); features that
    fire on fewer than k rows have fewer entries.
    """
    csc = sp.csc_matrix(activations)
    width = csc.shape[1]
    rows = np.full((width, k), -1, dtype=np.int64)
    values = np.zeros((width, k), dtype=np.float32)
    for feature in range(width):
        start, end = csc.indptr[feature], csc.indptr[feature + 1]
        data, index = csc.data[start:end], csc.indices[start:end]
        positive = data > 0
        data, index = data[positive], index[positive]
        if data.size == 0:
            continue
        take = np.argsort(-data, kind="stable")[:k]
        rows[feature, : take.size] = index[take]
        values[feature, : take.size] = data[take]
    return rows, values


def name_features(words: Sequence[str], word_activations: sp.spmatrix, image_keys: Sequence[str],
                  image_activations: sp.spmatrix, k_words: int = 10, k_images: int = 8) -> pa.Table:
    """One row per feature: ``feature``, ``name`` (top word, null if no word activates it),
    ``words``/``word_scores`` and ``images``/``image_scores`` (top-k, largest first)."""
    if word_activations.shape[1] != image_activations.shape[1]:
        raise ValueError(f"word and image activations differ in width: "
                         f"{word_activations.shape[1]} vs {image_activations.shape[1]}")
    word_rows, word_values = top_per_feature(word_activations, k_words)
    image_rows, image_values = top_per_feature(image_activations, k_images)
    words, image_keys = np.asarray(words, dtype=object), np.asarray(image_keys, dtype=object)
    top_words = [list(words[r[r >= 0]]) for r in word_rows]
    return pa.table({
        "feature": np.arange(word_rows.shape[0], dtype=np.int32),
        "name": [w[0] if w else None for w in top_words],
        "words": top_words,
        "word_scores": [list(v[r >= 0]) for r, v in zip(word_rows, word_values)],
        "images": [list(image_keys[r[r >= 0]]) for r in image_rows],
        "image_scores": [list(v[r >= 0]) for r, v in zip(image_rows, image_values)],
    })


def features_for_word(word_activations: sp.spmatrix, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """For every word (row), its k most activated features, largest first ([n, k], -1 padded):
    the atlas's "which features fire for this word" and steering's concept -> features."""
    csr = sp.csr_matrix(word_activations)
    top, values = top_per_feature(csr.T, k)
    return top, values


def caption_agreement(features: pa.Table, image_words: Mapping[str, set[str]]) -> dict[str, float]:
    """Where photos have captions but no labels: does a feature's name (its top word, from the
    text side) describe its top images (from the image side)? Per named feature, the share of its
    top images whose captions use the name; ``agreement`` is the mean over named features, and
    ``chance`` what the same names would score on images drawn at random (each name's share of
    all captioned images), so a model is judged against its own names' frequencies."""
    everyone = [words for words in image_words.values() if words]
    shares, chance = [], []
    for name, keys in zip(features.column("name").to_pylist(), features.column("images").to_pylist()):
        keys = [k for k in keys if image_words.get(k)]
        if not name or not keys or not everyone:
            continue
        shares.append(np.mean([name in image_words[k] for k in keys]))
        chance.append(np.mean([name in words for words in everyone]))
    if not shares:
        return {}
    return {"agreement": float(np.mean(shares)), "chance": float(np.mean(chance)), "features": len(shares),
            "agreeing_share": float(np.mean(np.asarray(shares) >= 0.5))}
