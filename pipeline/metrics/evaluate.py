"""The paper's quantitative evaluation of one model, from its extracted activations.

Everything is computed from the Parquet sets the extract stage wrote, with the plain functions
of :mod:`pipeline.metrics` (zero-shot scoring: :mod:`.zeroshot`), read through :mod:`pipeline.activations.store`, so a dense baseline, a Sparse CLIP
variant and (later) an SAE are measured by the same code:

- sparsity (Tab 3a): L0 of images and texts, active features, dead features, density;
- Clarity (Eq. 2, Tab 3a) against the reference encoder, and its dataset baseline;
- modality scores and their histogram against feature density (Fig 3b);
- zero-shot top-1/top-5 per labelled task, also with only each image's top-k features (supp. Fig 2);
- box classification on object crops and image/text retrieval R@1/R@5 (Tab 2);
- the text C-score against SBERT at several thresholds (supp. Fig 3);
- open-vocabulary tagging from the captions (real photos have no class labels, :mod:`.tagging`);
- ground-truth concept recovery (beyond the paper);
- linear concept probes and a token segmentation probe (beyond zero-shot, :mod:`.probes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipeline import metrics as M
from pipeline.activations.store import ActivationSet, aligned_reference
from pipeline.activations.tokens import token_grids
from pipeline.config import MetricsParams
from pipeline.data.captions import words_by_group
from pipeline.data.concepts import concept_ids
from pipeline.data.evalsets import LABELS, zero_shot_label
from pipeline.metrics._arrays import block_threads
from pipeline.metrics.probes import concept_probes, segmentation_probe
from pipeline.metrics.registry import Activations, compute
from pipeline.metrics.tagging import frequent_tags, tagging_auroc
from pipeline.metrics.zeroshot import (
    labelled_rows,
    task_classifiers,
)
from pipeline.plots import panel_row, plot_curves, save_figure


def evaluate(act_dir: str | Path, reference_dir: str | Path, vocab_dir: str | Path, params: MetricsParams,
             plot_dir: str | Path, title: str = "", modality: bool = True) -> dict[str, Any]:
    """All metrics of one model as a nested dict of numbers; figures written under ``plot_dir``.
    ``modality=False`` for a model that saw one modality only (an image SAE): it is single-modal
    by construction, and scoring it on the other modality would measure how it misreads it.
    The row blocks of the big metrics run on ``params.threads`` threads."""
    with block_threads(params.threads):
        return _evaluate(ActivationSet(act_dir), reference_dir, vocab_dir, params, Path(plot_dir), title, modality)


def _evaluate(acts: ActivationSet, reference_dir, vocab_dir, params: MetricsParams, plot_dir: Path, title: str,
              modality: bool) -> dict[str, Any]:
    images_meta, images = acts.load("images")
    result: dict[str, Any] = {"width": acts.width}
    result["image"] = compute("sparsity", Activations(images), params)
    result.update(clarity_metrics(images_meta, images, reference_dir, params))
    if acts.has("prompts"):
        result["zeroshot"] = zero_shot_metrics(acts, images_meta, images, params, plot_dir / "topk.png", title)
    if acts.has("texts"):  # a vision-only model (an SAE of a vision block) has image metrics alone
        texts_meta, texts = acts.load("texts")
        result["text"] = compute("sparsity", Activations(texts), params)
        if modality:
            result["modality"] = modality_metrics(images, texts, params, plot_dir / "modality.png", title)
        result["retrieval"] = retrieval_metrics(images_meta, images, texts_meta, texts)
    if acts.has("vocab"):
        result["cscore"] = cscore_metrics(acts, vocab_dir, params, plot_dir / "cscore.png", title)
        if acts.has("texts") and params.tag_words and (tagging := tagging_metrics(acts, images_meta, images,
                                                                                vocab_dir, params)):
            result["tagging"] = tagging
    result.update(concept_recovery_metrics(images_meta, images, params))
    result.update(probe_metrics(acts, images_meta, images))
    return result


def probe_metrics(acts: ActivationSet, meta: pa.Table, images: sp.csr_matrix) -> dict[str, Any]:
    """Beyond zero-shot: linear concept probes (val -> test) and the token segmentation probe."""
    out: dict[str, Any] = {}
    tasks = list(acts.manifest.get("zero_shot_tasks", {}))
    if tasks:
        probes = concept_probes(images, meta.column("split").to_pylist(), tasks, lambda task: _labels(meta, task))
        if probes:
            out["probe"] = probes
    if acts.has("tokens"):
        truths = {key: json.loads(m).get("truth") or {} for key, m in
                  zip(meta.column("key").to_pylist(), meta.column("meta").to_pylist())}
        segmentation = segmentation_probe(token_grids(*acts.load("tokens")), truths)
        if segmentation:
            out["segmentation_probe"] = segmentation
    return out


def clarity_metrics(meta: pa.Table, images: sp.csr_matrix, reference_dir, params: MetricsParams) -> dict[str, float]:
    return compute("clarity", Activations(images, reference=aligned_reference(meta, reference_dir)), params)


def modality_metrics(images: sp.csr_matrix, texts: sp.csr_matrix, params: MetricsParams, plot_path: Path,
                     title: str) -> dict[str, Any]:
    both = Activations(images, texts)
    scores, density = compute("modality", both, params), compute("feature_density", both, params)
    M.plot_modality_density(scores, density, plot_path, title=f"{title} modality vs density")
    return M.modality_summary(scores)


def _labels(meta: pa.Table, task: str) -> list[str | None]:
    return [zero_shot_label(json.loads(m), task) for m in meta.column("meta").to_pylist()]


def zero_shot_metrics(acts: ActivationSet, meta: pa.Table, images: sp.csr_matrix, params: MetricsParams,
                      plot_path: Path, title: str) -> dict[str, Any]:
    """Per task: accuracy on the test images with all features, and supplementary Fig 2's cut,
    both ways: ``labels_topk`` keeps each class-label embedding's top-k features (the
    supplementary's protocol: how few features name a class), ``images_topk`` each image's."""
    tasks = acts.manifest["zero_shot_tasks"]
    classifiers = task_classifiers(acts)
    test = np.asarray(meta.column("split").to_pylist()) == "test"
    out: dict[str, Any] = {}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for task, spec in tasks.items():
        classifier = classifiers[task]
        if acts.has(f"labelled_{task}"):
            task_meta, task_images = acts.load(f"labelled_{task}")
            rows, labels = labelled_rows(task_meta.column("label").to_pylist(), spec["classes"])
            task_images = task_images[rows]
        else:
            names = [name if in_test else None for name, in_test in zip(_labels(meta, task), test)]
            rows, labels = labelled_rows(names, spec["classes"])
            task_images = images[rows]
        if not labels:
            continue
        labelled = Activations(task_images, classifier=classifier, labels=labels)
        out[task] = compute("zeroshot", labelled, params)
        for cut in ("labels_topk", "images_topk"):
            accuracy = compute(cut, labelled, params)
            out[task][cut] = {f"top1_at_{k}": value for k, value in accuracy.items()}
            curves.setdefault(task, {})[cut] = accuracy
        out[task]["n"] = len(labels)
    if acts.has("crops") and "shape" in tasks:
        crop_meta, crops = acts.load("crops")
        rows, labels = labelled_rows(crop_meta.column("label").to_pylist(), tasks["shape"]["classes"])
        out["box_classification"] = compute("zeroshot", Activations(crops[rows], classifier=classifiers["shape"],
                                                                    labels=labels), params)
    if curves:
        plot_topk_zeroshot(curves, {task: out[task]["top1"] for task in curves}, plot_path, title)
    return out


def plot_topk_zeroshot(curves: dict[str, dict[str, dict[int, float]]], all_features: dict[str, float], path: Path,
                       title: str) -> Path:
    """Supplementary Fig 2, one panel per task: top-1 accuracy against k with only the class
    labels' top-k features (solid) and only each image's (dotted); all features dashed."""
    fig, axes = panel_row(len(curves))
    for ax, (task, lines) in zip(axes, curves.items()):
        for name, style in (("labels_topk", "-o"), ("images_topk", ":s")):
            ks = sorted(lines[name])
            ax.plot(ks, [lines[name][k] for k in ks], style, label=name.replace("_", " "))
        ax.axhline(all_features[task], ls="--", color="grey", label="all features")
        ax.set(xlabel="k (features kept)", ylabel="top-1", title=task)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, f"{title} zero-shot with top-k features (supp. Fig 2)")


def retrieval_metrics(images_meta: pa.Table, images: sp.csr_matrix, texts_meta: pa.Table,
                      texts: sp.csr_matrix) -> dict[str, float]:
    """IR@k / TR@k on the test split: every caption against every test image."""
    split = test_retrieval_split(images_meta, images, texts_meta, texts)
    return M.retrieval_recall(*split, ks=(1, 5, 10)) if split else {}


def test_retrieval_split(images_meta: pa.Table, images: sp.csr_matrix, texts_meta: pa.Table, texts: sp.csr_matrix,
                         ) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray] | None:
    """The test split's (images, captions, each caption's image row) that retrieval scores: the
    captions whose photo is among the test images; None when there is none."""
    image_split = np.asarray(images_meta.column("split").to_pylist()) == "test"
    text_split = np.asarray(texts_meta.column("split").to_pylist()) == "test"
    groups = np.asarray(images_meta.column("group").to_pylist())[image_split]
    owner = {g: i for i, g in enumerate(groups)}
    text_groups = np.asarray(texts_meta.column("group").to_pylist())[text_split]
    keep = np.asarray([g in owner for g in text_groups])
    if not image_split.any() or not keep.any():
        return None
    return (images[np.flatnonzero(image_split)], texts[np.flatnonzero(text_split)[keep]],
            np.asarray([owner[g] for g in text_groups[keep]]))


def tagging_metrics(acts: ActivationSet, images_meta: pa.Table, images: sp.csr_matrix, vocab_dir: str | Path,
                    params: MetricsParams) -> dict[str, Any] | None:
    """Open-vocabulary tagging on the test images (:mod:`.tagging`): the mean AUROC over the most
    frequent caption nouns that the vocabulary holds, and each tag's; None without such tags."""
    nouns_file = Path(vocab_dir) / "nouns.txt"
    texts_meta = acts.load("texts")[0]
    if not nouns_file.is_file() or "text" not in texts_meta.column_names:
        return None
    test = np.flatnonzero(np.asarray(images_meta.column("split").to_pylist()) == "test")
    test_texts = texts_meta.filter(pa.compute.equal(texts_meta.column("split"), "test"))
    words_of_group = words_by_group(test_texts.column("group").to_pylist(), test_texts.column("text").to_pylist())
    groups = images_meta.column("group").to_pylist()
    image_words = [words_of_group.get(groups[i], set()) for i in test]
    vocab_meta, vocab = acts.load("vocab")
    position = {w: i for i, w in enumerate(vocab_meta.column("key").to_pylist())}
    nouns = [w for w in nouns_file.read_text(encoding="utf-8").split() if w in position]
    tags = frequent_tags(image_words, nouns, params.tag_words, params.tag_min_images)
    if not tags:
        return None
    labels = np.array([[t in words for t in tags] for words in image_words], dtype=bool)
    auroc = tagging_auroc(images[test], vocab[[position[t] for t in tags]], labels)
    return {"auroc": float(np.nanmean(auroc)), "tags": len(tags), "images": len(test),
            "per_tag": {t: float(a) for t, a in zip(tags, auroc)}}


def cscore_metrics(acts: ActivationSet, vocab_dir: str | Path, params: MetricsParams, plot_path: Path,
                   title: str) -> dict[str, Any]:
    """Text C-score of the vocabulary sample vs SBERT, per activation threshold, and its baseline."""
    table = pq.read_table(Path(vocab_dir) / "sbert.parquet")
    words = table.column("word").to_pylist()
    sbert = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    vocab_meta, vocab = acts.load("vocab")
    position = {w: i for i, w in enumerate(vocab_meta.column("key").to_pylist())}
    rows = vocab[[position[w] for w in words]]
    out: dict[str, Any] = {"baseline": M.dataset_baseline(sbert), "words": len(words)}
    curve = {}
    for threshold in params.cscore_thresholds:
        value = M.c_score(rows, sbert, threshold=threshold, n_min=params.n_min)
        kept = rows.multiply(rows > threshold)
        out[f"at_{threshold:g}"] = value
        out[f"l0_at_{threshold:g}"] = M.l0(kept)
        curve[threshold] = {"c_score": value, "sbert_baseline": out["baseline"]}
    plot_curves(curve, [["c_score", "sbert_baseline"]], plot_path,
                title=f"{title} text C-score", xlabel="activation threshold")
    return out


# Which objects' concepts count as present in an image, per result key: every object's (the
# generator's own notion), or the main object's only, which every caption names and the zero-shot
# tasks score (the other objects are named in some captions only, so a feature that learned from the
# captions fires on few of their images). Background, word and count belong to the whole image.
RECOVERY_SCOPES: dict[str, str] = {"recovery": "all", "recovery_main": "main"}


def concept_recovery_metrics(meta: pa.Table, images: sp.csr_matrix, params: MetricsParams) -> dict[str, Any]:
    """For every ground-truth concept, the best single feature's AUROC/F1 at detecting it, per
    scope of :data:`RECOVERY_SCOPES`; empty for sources without ground truth."""
    truths = [json.loads(m).get("truth") for m in meta.column("meta").to_pylist()]
    rows = [i for i, t in enumerate(truths) if t]
    if not rows:
        return {}
    labelled = images[rows]
    out = {}
    for key, scope in RECOVERY_SCOPES.items():
        concept_sets = [{*concept_ids(truths[i], objects=scope), f"count:{LABELS['count'](truths[i])}"}
                        for i in rows]
        names = sorted(set().union(*concept_sets))
        labels = np.array([[name in s for name in names] for s in concept_sets], dtype=np.int8)
        out[key] = M.concept_recovery(labelled, labels, names, mono_auroc=params.mono_auroc,
                                      mono_precision=params.mono_precision,
                                      min_images=params.precise_min_images).to_dict()
    return out


def pop_concept_tables(result: dict[str, Any]) -> dict[str, list[dict]]:
    """Take the per-concept tables out of a result's recovery sections (they are files, not
    metrics): ``{"concept_recovery": [...], "concept_recovery_main": [...]}`` for those present."""
    return {f"concept_{key}": result[key].pop("concepts") for key in RECOVERY_SCOPES
            if "concepts" in result.get(key, {})}
