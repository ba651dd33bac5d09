"""Cross-modal retrieval recall: the IR@k / TR@k columns of the paper's Table 2 (COCO).

Image retrieval: each caption queries all images; a hit if its own image is in the top k.
Text retrieval: each image queries all captions; a hit if any of its captions is in the top k.
A target's rank is the number of candidates scoring strictly higher than it (ties count in the
query's favour). Similarities are computed a block of queries at a time, so memory stays near
``_BLOCK_ELEMENTS`` floats even for 25k images x 125k captions; sparse embeddings stay sparse
(each block's similarities come from a sparse product, never from an n x F dense copy).

An all-zero embedding (a sparse code with every feature off) has no direction: as a query it
finds nothing (rank = every candidate), as a candidate it ranks below every other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ._arrays import as_csr, row_blocks, unit_rows, unit_sparse_rows

_BLOCK_ELEMENTS = 1 << 24  # similarity entries per block: 128 MiB in float64


def _unit(embeddings):
    """(unit rows, [n] bool: the row is all-zero); sparse input stays sparse, dense stays dense."""
    if sp.issparse(embeddings):
        matrix = as_csr(embeddings)
        return unit_sparse_rows(matrix), np.diff(matrix.indptr) == 0
    unit = unit_rows(embeddings, keep_zero_rows=True)
    return unit, ~unit.any(axis=1)


def _similarities(queries, candidates, dead_candidates: np.ndarray) -> np.ndarray:
    """[q, c] dense cosine similarities of a block of queries; all-zero candidates at -inf."""
    sims = queries @ candidates.T
    sims = sims.toarray() if sp.issparse(sims) else np.asarray(sims)
    sims[:, dead_candidates] = -np.inf
    return sims


def _caption_ranks(images, texts, owner: np.ndarray, dead: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[T] for each caption, how many images score strictly higher than its own image."""
    dead_images, dead_texts = dead
    ranks = np.empty(texts.shape[0], dtype=np.int64)
    for rows in row_blocks(texts.shape[0], _BLOCK_ELEMENTS // images.shape[0]):
        sims = _similarities(texts[rows], images, dead_images)
        own = sims[np.arange(sims.shape[0]), owner[rows]]
        ranks[rows] = (sims > own[:, None]).sum(axis=1)
    ranks[dead_texts] = images.shape[0]
    return ranks


def _image_ranks(images, texts, owner: np.ndarray, dead: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[I] for each image, how many captions score strictly higher than its best own caption
    (every caption, if it has none)."""
    dead_images, dead_texts = dead
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(images.shape[0] + 1))
    ranks = np.empty(images.shape[0], dtype=np.int64)
    for rows in row_blocks(images.shape[0], _BLOCK_ELEMENTS // texts.shape[0]):
        sims = _similarities(images[rows], texts, dead_texts)
        captions = order[starts[rows.start]:starts[rows.stop]]
        local = owner[captions] - rows.start
        best = np.full(sims.shape[0], -np.inf)
        np.maximum.at(best, local, sims[local, captions])
        ranks[rows] = (sims > best[:, None]).sum(axis=1)
    ranks[dead_images] = texts.shape[0]
    return ranks


def retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of cosine-similarity retrieval in both directions.

    ``text_to_image[t]`` is the image row of caption row t (several captions per image allowed).
    Embeddings are dense arrays or ``scipy.sparse`` matrices.
    Returns ``image_retrieval_r{k}`` (text -> image, IR@k, averaged over captions) and
    ``text_retrieval_r{k}`` (image -> text, TR@k, averaged over images that have a caption).
    """
    (images, dead_images), (texts, dead_texts) = _unit(image_embeddings), _unit(text_embeddings)
    owner = np.asarray(text_to_image, dtype=np.int64)
    if owner.shape != (texts.shape[0],):
        raise ValueError(f"text_to_image must have one entry per caption ({texts.shape[0]}), got shape {owner.shape}")
    if owner.size and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError("text_to_image refers to image rows that do not exist")
    dead = (dead_images, dead_texts)
    caption_ranks = _caption_ranks(images, texts, owner, dead)
    has_caption = np.bincount(owner, minlength=images.shape[0]) > 0
    image_ranks = _image_ranks(images, texts, owner, dead)[has_caption]
    recall = {}
    for k in ks:
        recall[f"image_retrieval_r{k}"] = float((caption_ranks < k).mean())
        recall[f"text_retrieval_r{k}"] = float((image_ranks < k).mean())
    return recall
