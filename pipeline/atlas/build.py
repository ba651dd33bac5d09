"""Mapping one model's features from its extracted activations, and the atlas of all models.

:func:`map_model` reads the extract stage's sets and returns every table the atlas needs
(named features with their modality, density and Clarity; the evolution table; token grids and
the pointing game); :func:`build_atlas` writes Parquet, figures, the HTML site and a metrics
dict for every model. Nothing here touches Ray, DVC or MLflow.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image
from tqdm import tqdm

from pipeline import metrics as M
from pipeline.activations.sparse_io import evolution_set
from pipeline.activations.store import ActivationSet, aligned_reference
from pipeline.activations.tokens import heatmap, token_grids
from pipeline.atlas import figures, site
from pipeline.atlas.evolution import evolution_summary, evolution_table
from pipeline.atlas.localisation import FAMILIES, pointing_game, pointing_trials
from pipeline.atlas.naming import (
    caption_agreement,
    features_for_word,
    name_features,
    top_per_feature,
)
from pipeline.config import Params
from pipeline.data.captions import words_by_group
from pipeline.data.concepts import COLOURS, SHAPES, SYNONYMS, concept_ids
from pipeline.data.shards import caption_rows, read_split

log = logging.getLogger(__name__)

PLANTED = {"shape": SHAPES, "colour": tuple(COLOURS)}
HEATMAPS_PER_FEATURE = 3


@dataclass
class ModelMap:
    """Everything the atlas shows about one model."""

    variant: str
    width: int
    features: pa.Table  # naming + modality, density, clarity
    truths: dict[str, dict] = field(default_factory=dict)
    evolution: pa.Table | None = None
    grids: dict[str, sp.csr_matrix] = field(default_factory=dict)
    concept_features: dict[str, int] = field(default_factory=dict)
    word_features: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    splits: set[str] = field(default_factory=set)  # of the sample, where its images are read from


# --------------------------------------------------------------------------- mapping


def concept_features(words: Sequence[str], word_activations: sp.csr_matrix, concepts: Sequence[str]) -> dict[str, int]:
    """Each concept word's most activated feature in the text tower (words absent or silent: none)."""
    position = {w: i for i, w in enumerate(words)}
    out = {}
    for concept in concepts:
        row = word_activations[position[concept]] if concept in position else None
        if row is not None and row.nnz and row.data.max() > 0:
            out[concept] = int(row.indices[np.argmax(row.data)])
    return out


def naming_agreement(features: pa.Table, truths: Mapping[str, dict]) -> dict[str, Any]:
    """Do text-side names agree with image-side content? For every planted concept, the feature
    whose top images most often contain it (precision, ties to the larger scores), and whether
    the concept word or a synonym the captions use is among that feature's top words."""
    images = features.column("images").to_pylist()
    words = features.column("words").to_pylist()
    scores = features.column("image_scores").to_pylist()
    present = {k: set(concept_ids(t)) for k, t in truths.items() if t}
    mass = np.array([sum(s) for s in scores])
    rows: dict[str, dict] = {}
    for family, concepts in PLANTED.items():
        for concept in concepts:
            tag = f"{family}:{concept}"
            precision = np.array([np.mean([tag in present.get(k, ()) for k in keys]) if keys else 0.0
                                  for keys in images])
            best = int(np.lexsort((mass, precision))[-1])
            if precision[best] == 0:
                continue
            names = set(SYNONYMS.get(concept, (concept,))) | {concept}
            rows[tag] = {"feature": best, "precision": float(precision[best]),
                         "name": words[best][0] if words[best] else None,
                         "in_top_words": bool(names & set(words[best]))}
    out: dict[str, Any] = {"concepts": rows, "n": len(rows)}
    for family in [None, *PLANTED]:
        chosen = [r["in_top_words"] for tag, r in rows.items() if family is None or tag.startswith(f"{family}:")]
        out["in_top_words" if family is None else f"{family}.in_top_words"] = (
            float(np.mean(chosen)) if chosen else float("nan"))
    return out


@functools.lru_cache(maxsize=4)
def seen_words(data_dir: str, split: str = "train", min_count: int = 1, limit: int = 200_000) -> frozenset[str]:
    """Lower-case words used at least ``min_count`` times in (up to ``limit``) training captions;
    read once per process, however many models and snapshots are named."""
    counts: dict[str, int] = {}
    for row in caption_rows(data_dir, [split])[:limit]:
        for word in re.findall(r"[a-z][a-z'-]*", row["text"].lower()):
            counts[word] = counts.get(word, 0) + 1
    return frozenset(w for w, c in counts.items() if c >= min_count)


def naming_vocabulary(words: Sequence[str], params: Params) -> np.ndarray:
    """Rows of ``words`` used for naming: with ``atlas.min_word_count`` > 0 only words the
    training captions use that often. A text tower trained on a small caption vocabulary
    activates arbitrary features for words it never saw; the paper's web-scale model saw them all."""
    if not params.atlas.min_word_count:
        return np.arange(len(words))
    seen = seen_words(str(params.sample.out_dir), min_count=params.atlas.min_word_count)
    rows = np.asarray([i for i, w in enumerate(words) if w.lower() in seen], dtype=np.int64)
    if rows.size == 0:
        raise ValueError(f"no vocabulary word occurs {params.atlas.min_word_count}+ times in the training captions: "
                         "lower atlas.min_word_count (0 names with the whole vocabulary)")
    return rows


def _name(vocab_meta: pa.Table, vocab_acts: sp.csr_matrix, image_meta: pa.Table, image_acts: sp.csr_matrix,
          params: Params) -> pa.Table:
    words = vocab_meta.column("key").to_pylist()
    rows = naming_vocabulary(words, params)
    return name_features([words[i] for i in rows], vocab_acts[rows], image_meta.column("key").to_pylist(),
                         image_acts, params.atlas.top_words, params.atlas.top_images)


def _image_caption_words(images_meta: pa.Table, texts_meta: pa.Table) -> dict[str, set[str]]:
    """Each image's caption words (all captions of its photo), by image key; empty for an
    extraction without caption text."""
    if "text" not in texts_meta.column_names:
        return {}
    by_group = words_by_group(texts_meta.column("group").to_pylist(), texts_meta.column("text").to_pylist())
    return {k: by_group.get(g, set()) for k, g in zip(images_meta.column("key").to_pylist(),
                                                        images_meta.column("group").to_pylist())}


def map_model(variant: str, params: Params) -> ModelMap:
    """Name, measure, follow and locate every feature of one extracted model."""
    acts = ActivationSet(Path(params.extract.out_dir) / variant)
    images_meta, images = acts.load("images")
    _, texts = acts.load("texts")
    vocab_meta, vocab = acts.load("vocab")
    words = vocab_meta.column("key").to_pylist()
    named = _name(vocab_meta, vocab, images_meta, images, params)
    _, clarity = M.clarity(images, aligned_reference(images_meta, params.reference.out_dir),
                           tau=params.metrics.clarity_tau, n_min=params.metrics.n_min, per_feature=True)
    named = (named.append_column("modality", pa.array(M.modality_scores(images, texts)))
             .append_column("density", pa.array(M.feature_density(sp.vstack([images, texts]).tocsr())))
             .append_column("clarity", pa.array(clarity)))
    truths = {k: json.loads(m).get("truth") for k, m in zip(images_meta.column("key").to_pylist(),
                                                           images_meta.column("meta").to_pylist()) if m}
    top, values = features_for_word(vocab, k=5)
    model = ModelMap(variant, acts.width, named, {k: t for k, t in truths.items() if t},
                     word_features={w: [(int(f), float(v)) for f, v in zip(t, x) if f >= 0]
                                    for w, t, x in zip(words, top, values)})
    model.splits = set(images_meta.column("split").to_pylist())
    model.metrics["l0"] = M.l0(images)
    model.metrics["named_features"] = int(sum(n is not None for n in named.column("name").to_pylist()))
    model.metrics["distinct_names"] = len({n for n in named.column("name").to_pylist() if n})
    if model.truths:
        model.metrics["naming"] = naming_agreement(named, model.truths)
    if captions := caption_agreement(named, _image_caption_words(images_meta, acts.load("texts")[0])):
        model.metrics["caption_naming"] = captions
    model.evolution = _evolution(acts, params)
    if model.evolution is not None:
        model.metrics["evolution"] = evolution_summary(model.evolution)
    if acts.has("tokens"):
        tokens_meta, tokens = acts.load("tokens")
        model.grids = token_grids(tokens_meta, tokens)
        model.concept_features = concept_features(words, vocab, [c for cs in PLANTED.values() for c in cs])
        trials = pointing_trials(model.grids, model.truths, model.concept_features, FAMILIES)
        if trials:
            model.metrics["pointing"] = pointing_game(trials)
    return model


def _evolution(acts: ActivationSet, params: Params) -> pa.Table | None:
    tags = [t for t in acts.manifest.get("evolution", []) if acts.has(evolution_set(t, "vocab"))]
    if not tags:
        return None
    snapshots = []
    for tag in tqdm(tags, desc="evolution", unit="snapshot"):
        image_meta, images = acts.load(evolution_set(tag, "images"))
        named = _name(*acts.load(evolution_set(tag, "vocab")), image_meta, images, params)
        modality = M.modality_scores(images, acts.load(evolution_set(tag, "texts"))[1])
        snapshots.append((tag, named, modality))
    return evolution_table(snapshots)


# --------------------------------------------------------------------------- images


class ImageStore:
    """JPEG bytes of the sample's images by key, read once from the split shards."""

    def __init__(self, data_dir: str | Path, splits: Sequence[str], keys: set[str]):
        self.jpegs = {r.key: r.jpeg for s in splits for r in read_split(data_dir, s) if r.key in keys}

    def image(self, key: str) -> Image.Image:
        return Image.open(BytesIO(self.jpegs[key])).convert("RGB")

    def write(self, out_dir: Path) -> int:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, jpeg in self.jpegs.items():
            (out_dir / f"{key}.jpg").write_bytes(jpeg)
        return len(self.jpegs)


def referenced_keys(model: ModelMap) -> set[str]:
    keys = {k for ks in model.features.column("images").to_pylist() for k in ks} | set(model.grids)
    if model.evolution is not None:
        keys |= {k for ks in model.evolution.column("images").to_pylist() for k in ks}
    return keys


# --------------------------------------------------------------------------- figures and pages


def showcase(model: ModelMap, n: int) -> list[int]:
    """Features for the figures: concept-named ones first (planted concepts' text features),
    then the clearest named features."""
    chosen = list(dict.fromkeys(model.concept_features.values()))
    names = model.features.column("name").to_pylist()
    clarity = np.nan_to_num(model.features.column("clarity").to_numpy(zero_copy_only=False), nan=-1.0)
    chosen += [int(f) for f in np.argsort(-clarity) if names[f] and int(f) not in chosen]
    return chosen[:n]


def model_figures(model: ModelMap, store: ImageStore, out_dir: Path, cfg) -> list[str]:
    rows = model.features.to_pylist()
    chosen = showcase(model, max(cfg.grid_features, cfg.evolution_features))
    written = [figures.feature_grid([rows[f] for f in chosen[: cfg.grid_features]], store.image,
                                    out_dir / "features.png", f"{model.variant}: features by top words and images")]
    if model.evolution is not None:
        evolution = model.evolution.to_pylist()
        by_feature: dict[int, list] = {}
        for row in evolution:
            by_feature.setdefault(row["feature"], []).append(row)
        written.append(figures.evolution_strip([by_feature[f] for f in chosen[: cfg.evolution_features]], store.image,
                                               out_dir / "evolution.png", f"{model.variant}: features through training"))
    return [str(p.relative_to(out_dir)) for p in written]


def feature_heatmaps(model: ModelMap) -> dict[int, list[dict]]:
    """Per feature, the token-sample images where it fires hardest, with its [T] activations."""
    if not model.grids:
        return {}
    keys = list(model.grids)
    peaks = sp.csr_matrix(np.vstack([g.max(axis=0).toarray() for g in model.grids.values()]))
    rows, _ = top_per_feature(peaks, HEATMAPS_PER_FEATURE)
    return {f: [{"key": keys[r], "heat": [round(float(x), 3) for x in heatmap(model.grids[keys[r]], f).ravel()]}
                for r in picks if r >= 0] for f, picks in enumerate(rows)}


def write_model_site(model: ModelMap, out_dir: Path) -> None:
    rows = model.features.to_pylist()
    evolution: dict[int, list] = {}
    for row in model.evolution.to_pylist() if model.evolution is not None else []:
        evolution.setdefault(row["feature"], []).append(row)
    l0 = model.metrics.get("l0")
    site.write_index(out_dir, f"{model.variant}: {model.width} features",
                     f"L0 {l0:.1f} per image. Names are each feature's top vocabulary word (text tower); images "
                     "are its top activations (image tower).", rows, model.word_features)
    heatmaps = feature_heatmaps(model)
    for row in tqdm(rows, desc=f"atlas pages {model.variant}", unit="page", mininterval=5):
        site.write_feature_page(out_dir, row, heatmaps.get(row["feature"], []), evolution.get(row["feature"], []))


def comparison_panel(models: Sequence[ModelMap], store: ImageStore, path: Path, n: int) -> Path | None:
    """Heatmaps of the feature the main object's colour word activates, models side by side
    (avg vs cls pooling). Colour, because it is what the embedded models learn first."""
    models = [m for m in models if m.grids and m.concept_features]
    if not models:
        return None
    first = models[0]
    panels = []
    for key in sorted(k for k in first.grids if k in first.truths):
        main = first.truths[key]["objects"][first.truths[key].get("main", 0)]
        if not all(main["colour"] in m.concept_features and key in m.grids for m in models):
            continue
        heats = {m.variant: heatmap(m.grids[key], m.concept_features[main["colour"]]) for m in models}
        panels.append({"key": key, "concept": main["colour"], "heats": heats})
        if len(panels) == n:
            break
    if not panels:
        return None
    return figures.heatmap_panel(panels, store.image, path, "per-token activation of the main object's colour feature")


# --------------------------------------------------------------------------- all models


def build_atlas(params: Params) -> dict[str, Any]:
    """Map every configured model and write the atlas; returns {variant: metrics} plus the
    pooling comparison. Figures land in ``<out_dir>/<variant>/`` and ``<out_dir>/heatmaps.png``."""
    cfg, out_dir = params.atlas, Path(params.atlas.out_dir)
    models = []
    for variant in params.atlas_variants():
        log.info("atlas: mapping %s", variant)
        models.append(map_model(variant, params))
    store = ImageStore(params.sample.out_dir, sorted(set().union(*(m.splits for m in models))),
                       set().union(*map(referenced_keys, models)))
    store.write(out_dir / "images")
    summary: dict[str, Any] = {}
    for model in models:
        model_dir = out_dir / model.variant
        model_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(model.features, model_dir / "features.parquet")
        if model.evolution is not None:
            pq.write_table(model.evolution, model_dir / "evolution.parquet")
        model.metrics["figures"] = model_figures(model, store, model_dir, cfg)
        write_model_site(model, model_dir)
        summary[model.variant] = model.metrics
    compared = [m for name in cfg.heatmap_models for m in models if m.variant == name]
    panel = comparison_panel(compared, store, out_dir / "heatmaps.png", cfg.heatmap_images)
    site.write_root(out_dir, [{"variant": m.variant, "width": m.width, "l0": m.metrics.get("l0"),
                               "pointing": m.metrics.get("pointing", {}).get("accuracy"),
                               "figures": m.metrics["figures"]} for m in models])
    summary["heatmap_panel"] = str(panel) if panel else None
    return summary
