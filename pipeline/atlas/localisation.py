"""Where in the image a feature fires (supplementary Fig 1), and a number for it.

A ViT's spatial tokens each pass through the sparse head (:meth:`SparseCLIP.encode_image_tokens`),
so a feature's activation per token, on the patch grid, is a heatmap. The paper says Sparse-Avg
(trained on the mean of token activations) localises better than CLS pooling, but imprecisely;
on the embedded data every object's box is known, so the **pointing game** measures it: for each
object, take the feature its concept word activates most in the text tower, find the hottest
token, and score a hit when that token's centre lies inside a box of an object with the concept.
Chance is the fraction of the grid those boxes cover.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline.activations.tokens import heatmap, inside_boxes, token_centres

FAMILIES = ("shape", "colour")


def pointing_trials(grids: Mapping[str, sp.csr_matrix], truths: Mapping[str, dict[str, Any]],
                    concept_features: Mapping[str, int], families: Sequence[str] = FAMILIES) -> list[dict]:
    """One trial per (image, concept present in it): the concept's feature, its hottest token,
    whether that token is inside a box of the concept, and the chance of a random token being so."""
    trials = []
    for key, grid in grids.items():
        truth = truths.get(key)
        if not truth or not truth.get("objects"):
            continue
        side = math.isqrt(grid.shape[0])
        size = truth.get("image_size", 1)
        centres = token_centres(side, size, size)
        for family in families:
            for concept in sorted({o[family] for o in truth["objects"]}):
                if concept not in concept_features:
                    continue
                feature = concept_features[concept]
                boxes = [o["bbox"] for o in truth["objects"] if o[family] == concept]
                heat = heatmap(grid, feature).ravel()
                target = inside_boxes(centres, boxes)
                hottest = int(np.argmax(heat))
                trials.append({"key": key, "family": family, "concept": concept, "feature": feature,
                               "token": hottest, "silent": bool(heat.max() <= 0),
                               "hit": bool(heat.max() > 0 and target[hottest]), "chance": float(target.mean())})
    return trials


def pointing_game(trials: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy (hits / trials; a feature silent on every token is a miss) and chance, overall
    and per concept family."""
    out: dict[str, float] = {}
    for family in [None, *sorted({t["family"] for t in trials})]:
        chosen = [t for t in trials if family is None or t["family"] == family]
        prefix = "" if family is None else f"{family}."
        out[f"{prefix}accuracy"] = float(np.mean([t["hit"] for t in chosen])) if chosen else float("nan")
        out[f"{prefix}chance"] = float(np.mean([t["chance"] for t in chosen])) if chosen else float("nan")
        out[f"{prefix}trials"] = len(chosen)
        out[f"{prefix}silent"] = int(sum(t["silent"] for t in chosen))
    return out
