"""Zero-shot classification as CLIP defines it: each class is the normalised mean of its prompt
embeddings; an input gets the class of highest cosine similarity. The same code serves dense and
sparse models, during training (torch) and on extracted activations (scipy.sparse, any size)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from pipeline.metrics._arrays import map_blocks, row_blocks


@torch.no_grad()
def class_embeddings(encode_text, tokenize, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, F] normalised class embeddings; ``encode_text`` maps token ids to (unnormalised) features."""
    rows = []
    for name in classes:
        prompts = tokenize([template.format(name) for template in templates])
        rows.append(F.normalize(F.normalize(encode_text(prompts), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def classifier_from_prompts(prompt_activations, prompt_labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """[C, F] class embeddings from extracted prompt activations (rows labelled by class name)."""
    rows = sp.csr_matrix(prompt_activations, dtype=np.float64)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    unit = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ rows
    labels = np.asarray(prompt_labels)
    out = np.stack([np.asarray(unit[labels == name].mean(axis=0)).ravel() for name in classes])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


_ROWS_PER_BLOCK = 16_384


def cosine_scores(activations, classifier: np.ndarray) -> np.ndarray:
    """[n, C] cosine similarity of each (sparse or dense) row to each class, without densifying.
    ``classifier`` may be sparse too (a class embedding cut to its top-k features): the product
    then costs O(matches), not O(nnz x C). Rows are converted to float64 a block at a time, so
    the memory beyond the [n, C] result is a block's, not a float64 copy of the whole matrix;
    each block fills its own rows of the result, on :func:`~pipeline.metrics._arrays.block_threads`'
    threads (a row's scores do not depend on the blocks, so neither do the bits)."""
    matrix = sp.csr_matrix(activations)
    out = np.empty((matrix.shape[0], classifier.shape[0]))

    def fill(block: slice) -> None:
        rows = sp.csr_matrix(matrix[block], dtype=np.float64)
        norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
        scores = rows @ classifier.T
        out[block] = scores.toarray() if sp.issparse(scores) else scores
        out[block] /= np.maximum(norms, 1e-12)[:, None]

    for _ in map_blocks(fill, row_blocks(matrix.shape[0], _ROWS_PER_BLOCK)):
        pass
    return out


def labelled_rows(names: Sequence[str | None], classes: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """The rows that have a label (an image with no main object has none) and each one's class
    index: the one way every evaluation turns label names into targets."""
    rows = np.flatnonzero([name is not None for name in names])
    return rows, [classes.index(names[i]) for i in rows]


def zero_shot_accuracy(features, classifier, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of cosine-similarity classification of (dense, sparse or torch) features
    against [C, F] class embeddings, and ``chance``: what the best constant prediction scores."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    if isinstance(classifier, torch.Tensor):
        classifier = classifier.detach().float().cpu().numpy()
    scores = cosine_scores(features, np.asarray(classifier, dtype=np.float64))
    return {**accuracy_from_scores(scores, labels, ks), "chance": constant_accuracy(labels)}


def constant_accuracy(labels: Sequence[int]) -> float:
    """Top-1 accuracy of always answering the most common class: the chance level a task's
    accuracy must beat (1 / classes only when the classes are balanced)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / counts.sum()) if counts.size else float("nan")


def accuracy_from_scores(scores, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy; k above the class count is capped (so top5 of 3 classes is 1.0)."""
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=-1).indices
    hits = ranked == target[:, None]
    return {f"top{k}": hits[:, :k].any(-1).float().mean().item() for k in ks}


def task_classifiers(acts) -> dict[str, np.ndarray]:
    """Zero-shot class embeddings [C, F] of every task of an activation store
    (:class:`pipeline.activations.store.ActivationSet`), from its extracted prompts."""
    prompts_meta, prompts = acts.load("prompts")
    task_of = np.asarray(prompts_meta.column("task").to_pylist())
    label_of = np.asarray(prompts_meta.column("label").to_pylist())
    return {task: classifier_from_prompts(prompts[task_of == task], label_of[task_of == task], spec["classes"])
            for task, spec in acts.zero_shot_tasks.items()}
