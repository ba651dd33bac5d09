"""Cross-modal retrieval recall: the IR@k / TR@k columns of the paper's Table 2 (COCO).

Image retrieval: each caption queries all images; a hit if its own image is in the top k.
Text retrieval: each image queries all captions; a hit if any of its captions is in the top k.
A target's rank is the number of candidates scoring strictly higher than it (ties count in the
query's favour). Similarities are computed a block of queries at a time, so memory stays near
``_BLOCK_ELEMENTS`` floats even for 25k images x 125k captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._arrays import row_blocks, unit_rows

_BLOCK_ELEMENTS = 1 << 24  # similarity entries per block: 128 MiB in float64


def _caption_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[T] for each caption, how many images score strictly higher than its own image."""
    ranks = np.empty(len(texts), dtype=np.int64)
    for rows in row_blocks(len(texts), _BLOCK_ELEMENTS // len(images)):
        sims = texts[rows] @ images.T
        own = sims[np.arange(sims.shape[0]), owner[rows]]
        ranks[rows] = (sims > own[:, None]).sum(axis=1)
    return ranks


def _image_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[I] for each image, how many captions score strictly higher than its best own caption
    (every caption, if it has none)."""
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(len(images) + 1))
    ranks = np.empty(len(images), dtype=np.int64)
    for rows in row_blocks(len(images), _BLOCK_ELEMENTS // len(texts)):
        sims = images[rows] @ texts.T
        captions = order[starts[rows.start]:starts[rows.stop]]
        local = owner[captions] - rows.start
        best = np.full(sims.shape[0], -np.inf)
        np.maximum.at(best, local, sims[local, captions])
        ranks[rows] = (sims > best[:, None]).sum(axis=1)
    return ranks


def retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of cosine-similarity retrieval in both directions.

    ``text_to_image[t]`` is the image row of caption row t (several captions per image allowed).
    Returns ``image_retrieval_r{k}`` (text -> image, IR@k, averaged over captions) and
    ``text_retrieval_r{k}`` (image -> text, TR@k, averaged over images that have a caption).
    """
    images, texts = unit_rows(image_embeddings), unit_rows(text_embeddings)
    owner = np.asarray(text_to_image, dtype=np.int64)
    if owner.shape != (len(texts),):
        raise ValueError(f"text_to_image must have one entry per caption ({len(texts)}), got shape {owner.shape}")
    if owner.size and (owner.min() < 0 or owner.max() >= len(images)):
        raise ValueError("text_to_image refers to image rows that do not exist")
    caption_ranks = _caption_ranks(images, texts, owner)
    has_caption = np.bincount(owner, minlength=len(images)) > 0
    image_ranks = _image_ranks(images, texts, owner)[has_caption]
    recall = {}
    for k in ks:
        recall[f"image_retrieval_r{k}"] = float((caption_ranks < k).mean())
        recall[f"text_retrieval_r{k}"] = float((image_ranks < k).mean())
    return recall
