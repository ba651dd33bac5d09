"""How far open-vocabulary tagging can go on a real-photo run: two ceilings beside the models' AUROC.

Tagging (:mod:`pipeline.metrics.tagging`) scores each test photo against a caption noun and labels
it by whether the photo's captions use the noun. Two things can hold that AUROC down: what the
frozen image tower sees, and what the labels are. This benchmark measures each apart, per tag:

- **the tower's probe**: a logistic regression per tag on the locked image tower's cached features
  (unit norm), fitted on the train photos' caption labels and scored on the test photos. The
  models' zero-shot score is a function of those same features (the trainable projection and head
  sit on top of them), so the probe, fitted to the very labels it is scored on, is what a linear
  read-out of this tower reaches with this much data;
- **the captioners' agreement**: for each caption of a test photo, whether it uses the noun,
  ranked by how many of the photo's *other* captions do. Five people looked at the same pixels;
  where that AUROC is low, the word is the captioner's choice ("man" or "person"), not the image's.

    python -m benchmarks.tagging_ceiling --workspace ../main-flickr8k

The workspace must have run the preset through ``metrics`` (its tags and the models' AUROC are
read from ``metrics/<variant>.json``) with a feature cache of locked towers. Prints a row per tag
group and writes ``benchmarks/results/tagging_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def caption_labels(rows: Sequence[dict], tags: Sequence[str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Photos (groups, in first-seen order), their tag labels [photos, tags] (any caption uses the
    tag) and, per photo, its captions' labels [captions, tags]."""
    from pipeline.data.captions import caption_words

    by_group: dict[str, list[set[str]]] = {}
    for row in rows:
        by_group.setdefault(str(row["group"] or row["key"]), []).append(caption_words(row["caption"]))
    groups = list(by_group)
    per_caption = [np.array([[t in words for t in tags] for words in by_group[g]], dtype=bool) for g in groups]
    return groups, np.array([c.any(axis=0) for c in per_caption], dtype=bool), per_caption


def agreement_auroc(per_caption: Sequence[np.ndarray]) -> np.ndarray:
    """Per tag, the AUROC of "this caption uses the tag" against the count of the same photo's other
    captions that do, over every caption of every photo with at least two captions."""
    from pipeline.metrics.tagging import _auroc

    labels, scores = [], []
    for captions in per_caption:
        if len(captions) < 2:
            continue
        labels.append(captions)
        scores.append(captions.sum(axis=0, keepdims=True) - captions)
    labels, scores = np.concatenate(labels), np.concatenate(scores).astype(float)
    return np.array([_auroc(scores[:, j], labels[:, j]) for j in range(labels.shape[1])])


def probe_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                c: float) -> np.ndarray:
    """Per tag, the test AUROC of a logistic regression fitted on the train rows (NaN where either
    split has one class only)."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.metrics.tagging import _auroc

    out = np.full(train_y.shape[1], np.nan)
    for j in range(train_y.shape[1]):
        if train_y[:, j].all() or not train_y[:, j].any():
            continue
        model = LogisticRegression(C=c, max_iter=3000).fit(train_x, train_y[:, j])
        out[j] = _auroc(model.decision_function(test_x), test_y[:, j])
    return out


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def main(argv: Sequence[str] | None = None) -> None:
    from pipeline.clip.feature_cache import FeatureCache
    from pipeline.config import load_params
    from pipeline.data.shards import index_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="a run of deploy/params.flickr8k.yaml through metrics")
    parser.add_argument("--c", type=float, default=1.0, help="the probe's inverse L2 strength")
    parser.add_argument("--out", default=str(RESULTS / "tagging_ceiling.json"))
    args = parser.parse_args(argv)
    workspace = Path(args.workspace).resolve()
    command = f"python -m benchmarks.tagging_ceiling --workspace {args.workspace}" + (f" --c {args.c:g}" if args.c != 1.0 else "")
    params = load_params(workspace / "params.yaml")
    metrics = {v: json.loads((workspace / params.metrics.out_dir / f"{v}.json").read_text())
               for v in params.train.variants if (workspace / params.metrics.out_dir / f"{v}.json").is_file()}
    if not metrics:
        raise SystemExit(f"{workspace / params.metrics.out_dir}: no model metrics; run the preset through metrics")
    zero_shot = {v: {k.removeprefix("tagging.per_tag."): a for k, a in m.items() if k.startswith("tagging.per_tag.")}
                 for v, m in metrics.items()}
    tags = list(next(iter(zero_shot.values())))
    cache = FeatureCache(workspace / params.train.feature_cache_dir)
    data_dir = workspace / params.sample.out_dir
    split_rows = {s: [row for _, _, row in index_rows(data_dir, [s])] for s in ("train", "test")}
    train_groups, train_y, _ = caption_labels(split_rows["train"], tags)
    test_groups, test_y, test_captions = caption_labels(split_rows["test"], tags)
    features = {name: unit(cache.images[[cache.image_by_group[g] for g in groups]].reshape(len(groups), -1))
                for name, groups in (("train", train_groups), ("test", test_groups))}
    probe = probe_auroc(features["train"], train_y, features["test"], test_y, args.c)
    agreement = agreement_auroc(test_captions)
    per_tag = {t: {"probe": float(probe[j]), "agreement": float(agreement[j]),
                   "test_photos": int(test_y[:, j].sum()),
                   **{f"zero_shot.{v}": zero_shot[v].get(t) for v in zero_shot}} for j, t in enumerate(tags)}
    result = {"command": command, "machine": "2 CPU cores", "tower": cache.manifest.get("towers"), "probe_c": args.c,
              "train_photos": len(train_groups), "test_photos": len(test_groups), "tags": len(tags),
              "mean": {"probe": float(np.nanmean(probe)), "agreement": float(np.nanmean(agreement)),
                       **{f"zero_shot.{v}": float(np.nanmean(list(z.values()))) for v, z in zero_shot.items()}},
              "tags_at_0.85": {"probe": int((probe >= 0.85).sum()),
                               **{f"zero_shot.{v}": sum(a >= 0.85 for a in z.values()) for v, z in zero_shot.items()}},
              "per_tag": per_tag}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    columns = ["probe", "agreement", *(f"zero_shot.{v}" for v in zero_shot)]
    print(f"{'tag':12s}" + "".join(f"{c:>20s}" for c in columns))
    for t in tags:
        print(f"{t:12s}" + "".join(f"{per_tag[t][c]:20.3f}" for c in columns))
    print(f"{'mean':12s}" + "".join(f"{result['mean'][c]:20.3f}" for c in columns))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
