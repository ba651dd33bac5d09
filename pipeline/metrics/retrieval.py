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
    caption_ranks, image_ranks = retrieval_ranks(image_embeddings, text_embeddings, text_to_image)
    recall = {}
    for k in ks:
        recall[f"image_retrieval_r{k}"] = float((caption_ranks < k).mean())
        recall[f"text_retrieval_r{k}"] = float((image_ranks < k).mean())
    return recall


def retrieval_ranks(image_embeddings, text_embeddings, text_to_image) -> tuple[np.ndarray, np.ndarray]:
    """Each query's rank of its target, as :func:`retrieval_recall` counts them: per caption [T],
    how many images score above its own; per image that has a caption, how many captions score
    above its best own caption (in image order). A query is a hit at k when its rank is below k."""
    (images, dead_images), (texts, dead_texts) = _unit(image_embeddings), _unit(text_embeddings)
    owner = np.asarray(text_to_image, dtype=np.int64)
    if owner.shape != (texts.shape[0],):
        raise ValueError(f"text_to_image must have one entry per caption ({texts.shape[0]}), got shape {owner.shape}")
    if owner.size and (owner.min() < 0 or owner.max() >= images.shape[0]):
        raise ValueError("text_to_image refers to image rows that do not exist")
    dead = (dead_images, dead_texts)
    has_caption = np.bincount(owner, minlength=images.shape[0]) > 0
    return _caption_ranks(images, texts, owner, dead), _image_ranks(images, texts, owner, dead)[has_caption]


def recall_difference(hits: np.ndarray, baseline_hits: np.ndarray, groups: np.ndarray, resamples: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """How much a model's recall exceeds a baseline's on the same queries, with a 95% interval.

    ``hits`` and ``baseline_hits`` are [Q] booleans for the same queries, ``groups`` [Q] the test
    photo each query belongs to. The interval comes from a paired bootstrap over photos: a
    resample draws photos with replacement and keeps all of their queries for both models, so it
    says how much the difference depends on which photos the test split drew (two models' hits on
    one photo are correlated, and so are a photo's five captions), not on the queries' number."""
    hits, baseline_hits = np.asarray(hits, dtype=np.float64), np.asarray(baseline_hits, dtype=np.float64)
    if hits.shape != baseline_hits.shape or hits.shape != np.shape(groups):
        raise ValueError(f"hits {hits.shape}, baseline {baseline_hits.shape} and groups {np.shape(groups)} "
                         "must have one entry per query")
    _, group = np.unique(groups, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.size else 0
    if n_groups == 0:
        raise ValueError("recall_difference needs at least one query")
    per_group_difference = np.bincount(group, weights=hits - baseline_hits, minlength=n_groups)
    per_group_queries = np.bincount(group, minlength=n_groups).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples)
    boot = (draws @ per_group_difference) / (draws @ per_group_queries)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"difference": float((hits - baseline_hits).mean()), "ci95_low": float(low), "ci95_high": float(high),
            "queries": int(hits.size), "photos": n_groups}
