"""Real photos: what the sparse heads on locked pretrained towers reach, against dense, per setting.

Reads the feature cache of a Flickr8k workspace (``make pipeline-flickr8k STAGES=tower_cache``:
EfficientNet-lite0 and MiniLM outputs for every photo and caption) and trains the projections and
heads with the pipeline's own recipe (:func:`pipeline.clip.train.train_in_process` on cached
inputs), one setting at a time: the dense baseline and sparse heads at several logit-scale caps,
expansions and step counts. Each is scored on the test split: retrieval R@1/5/10 both ways (every
caption against every test photo), open-vocabulary tagging AUROC on the workspace's tags (its
metrics stage's, :mod:`pipeline.metrics.tagging`), L0 and dead features per tower. The preset
(``deploy/params.flickr8k.yaml``) takes its caps and steps from this table.

    python -m benchmarks.flickr8k_heads --workspace ../main-flickr8k
    python -m benchmarks.flickr8k_heads --workspace ../main-flickr8k --only dense sparse_cap50 --seeds 0 1 2

The ``*_block6`` settings also train lite0's last block and head (``lock.image_unlocked_groups: 1``),
the ``*_text2`` ones MiniLM's last two layers (``lock.text_unlocked_layers: 2``, at the 350 steps
that suit both heads on val); each reads a cache of its lock (the input of the first trainable block or
layer), written by the tower_cache stage with that override and ``train.feature_cache_dir`` pointing
elsewhere, given as ``--cache``.

Prints one row per setting and seed (and, with several seeds, each setting's mean and spread: a
gap between two settings means little unless it exceeds how far one setting moves between
seeds) and writes ``benchmarks/results/flickr8k_heads.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.clip.feature_cache import FeatureCache, cached_split
from pipeline.clip.recipe import train_in_process
from pipeline.config import LockParams, ModelParams, load_params
from pipeline.data.captions import words_by_group
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.data.shards import index_rows
from pipeline.runtime.job import read_override
from pipeline.metrics import sparsity
from pipeline.metrics.retrieval import retrieval_recall
from pipeline.metrics.tagging import tagging_auroc

RESULTS = Path(__file__).parent / "results"
PRESET = Path(__file__).parents[1] / "deploy" / "params.flickr8k.yaml"

BLOCK6 = {"image": True, "image_unlocked_groups": 1, "text": True}  # lite0's block 6.0 and head train
TEXT2 = {"image": True, "text": True, "text_unlocked_layers": 2}  # MiniLM's last two layers train (LiT's other half)

# name -> (model overrides, optim overrides, steps)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "dense": ({"expansion": 0, "activation": "none", "logit_scale_cap": 100}, {}, 700),
    "sparse_cap50": ({"logit_scale_cap": 50}, {}, 700),
    "sparse_cap40": ({"logit_scale_cap": 40}, {}, 700),
    "sparse_cap20": ({"logit_scale_cap": 20}, {}, 700),
    "sparse_cap15": ({"logit_scale_cap": 15}, {}, 700),
    "sparse_cap10": ({"logit_scale_cap": 10}, {}, 700),
    "sparse_cap50_x32": ({"logit_scale_cap": 50, "expansion": 32}, {}, 700),
    "sparse_cap50_x8": ({"logit_scale_cap": 50, "expansion": 8}, {}, 700),
    "sparse_cap50_350": ({"logit_scale_cap": 50}, {}, 350),
    "sparse_cap50_head_wd1": ({"logit_scale_cap": 50}, {"head_weight_decay": 1.0}, 700),
    "dense_350": ({"expansion": 0, "activation": "none", "logit_scale_cap": 100}, {}, 350),
    "sparse_cap20_350": ({"logit_scale_cap": 20}, {}, 350),
    "sparse_cap50_350_bias": ({"logit_scale_cap": 50, "head_bias_init": -0.5}, {}, 350),
    "sparse_cap50_350_lr2": ({"logit_scale_cap": 50}, {"lr": 0.002}, 350),
    "sparse_cap50_1400": ({"logit_scale_cap": 50}, {}, 1400),
    "dense_1400": ({"expansion": 0, "activation": "none", "logit_scale_cap": 100}, {}, 1400),
    "dense_block6": ({"expansion": 0, "activation": "none", "logit_scale_cap": 100, "lock": BLOCK6}, {}, 700),
    "sparse_cap50_block6": ({"logit_scale_cap": 50, "lock": BLOCK6}, {}, 700),
    "dense_text2_350": ({"expansion": 0, "activation": "none", "logit_scale_cap": 100, "lock": TEXT2}, {}, 350),
    "sparse_cap50_text2_350": ({"logit_scale_cap": 50, "lock": TEXT2}, {}, 350),
}


def eval_pairs(cache: Path, data_dir: Path, split: str, tags: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A split's cached photos (one row each) and captions, each caption's photo, and each photo's
    tag labels (``tags``: whether any of its captions uses the tag)."""
    rows = [row for _, _, row in index_rows(data_dir, [split])]
    pairs = cached_split(cache, data_dir, split)
    photo_of: dict[str, int] = {}
    first = []
    for i, row in enumerate(rows):
        if str(row["group"]) not in photo_of:
            photo_of[str(row["group"])] = len(first)
            first.append(i)
    owner = np.asarray([photo_of[str(row["group"])] for row in rows])
    words = words_by_group((str(row["group"]) for row in rows), (row["caption"] for row in rows))
    tag_labels = np.array([[t in words[g] for t in tags] for g in photo_of], dtype=bool).reshape(len(photo_of), len(tags))
    return {"image": pairs["image"][first], "text": pairs["text"], "tag_labels": tag_labels}, owner


def workspace_tags(workspace: Path, params) -> list[str]:
    """The tags the workspace's metrics stage scored (the same for every model), or none."""
    for variant in params.train.variants:
        path = workspace / params.metrics.out_dir / f"{variant}.json"
        if path.is_file():
            return [k.removeprefix("tagging.per_tag.") for k in json.loads(path.read_text())
                    if k.startswith("tagging.per_tag.")]
    return []


def measure(name: str, params, test: dict[str, np.ndarray], owner: np.ndarray, train: dict[str, np.ndarray],
            seed: int, tags: list[str]) -> dict[str, Any]:
    model_overrides, optim_overrides, steps = SETTINGS[name]
    model_params = ModelParams.model_validate({**params.train.model.model_dump(), **model_overrides})
    train_params = params.train.model_copy(update={"optim": params.train.optim.model_copy(update=optim_overrides),
                                                  "log_every": steps})
    started = time.perf_counter()
    model, curves = train_in_process(model_params, train_params, train, None, steps, seed, cached_inputs=True)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        images = model.encode_image_features(torch.as_tensor(test["image"])).numpy()
        texts = model.encode_text_features(torch.as_tensor(test["text"])).numpy()
    row: dict[str, Any] = {"setting": name, "seed": seed, "steps": steps, "seconds": round(seconds, 1),
                           "width": model.width,
                           **{k: v for k, v in model_overrides.items() if k != "activation"}}
    row.update(retrieval_recall(images, texts, owner, ks=(1, 5, 10)))
    if tags:
        with torch.no_grad():
            tag_texts = model.encode_text(torch.as_tensor(ClipBatchPreprocessor.for_model(model).tokens(tags))).numpy()
        row["tagging_auroc"] = float(np.nanmean(tagging_auroc(images, tag_texts, test["tag_labels"])))
    for tower, x in (("image", images), ("text", texts)):
        row[f"l0_{tower}_pct"] = sparsity.l0_summary(float((x != 0).sum()), len(x), model.width)["l0_pct"]
    fired = (images != 0).sum(0) + (texts != 0).sum(0)
    row["dead_pct"] = 100 * sparsity.dead_share(fired)
    row["final_loss"] = curves[max(curves)]["train/loss"]
    row["logit_scale"] = curves[max(curves)]["train/logit_scale"]
    return row


SCORES = ("image_retrieval_r5", "text_retrieval_r5", "text_retrieval_r1", "tagging_auroc")


def seed_spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting run with several seeds: the mean and sample standard deviation of its retrieval and tagging
    (keyed by the setting's name, "<name> (val)" where scored on the val split)."""
    def key_of(row: dict[str, Any]) -> str:
        split = row.get("split", "test")
        return row["setting"] if split == "test" else f"{row['setting']} ({split})"

    out = {}
    for name in dict.fromkeys(key_of(r) for r in rows):
        runs = [r for r in rows if key_of(r) == name]
        if len(runs) > 1:
            out[name] = {"seeds": len(runs), **{key: {"mean": float(np.mean([r[key] for r in runs])),
                                                      "sd": float(np.std([r[key] for r in runs], ddof=1))}
                                                for key in SCORES if all(key in r for r in runs)}}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flickr8k_heads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="the Flickr8k workspace (after its tower_cache stage)")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", choices=["val", "test"], default="test", help="where retrieval is scored: choose "
                        "settings on val, report the chosen one on test")
    parser.add_argument("--cache", help="the feature cache to read (default: the workspace's); every setting run "
                        "must match its towers and lock")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workspace = Path(args.workspace).resolve()
    params = load_params(workspace / "params.yaml", read_override(PRESET))
    cache = Path(args.cache).resolve() if args.cache else workspace / params.train.feature_cache_dir
    data_dir = workspace / params.sample.out_dir
    names = args.only or list(SETTINGS)
    for name in names:
        lock = {**params.train.model.lock.model_dump(), **SETTINGS[name][0].get("lock", {})}
        if not FeatureCache.available(cache, params.train.model.model_copy(update={"lock": LockParams(**lock)})):
            raise SystemExit(f"{name}: {cache} does not hold this setting's towers and lock ({lock}); give --cache")
    train = cached_split(cache, data_dir, "train")
    tags = workspace_tags(workspace, params)
    test, owner = eval_pairs(cache, data_dir, args.split, tags)
    print(f"{len(train['text'])} training pairs; {args.split}: {len(test['image'])} photos, {len(owner)} captions, "
          f"{len(tags)} tags")
    rows = []
    for name in names:
        for seed in args.seeds:
            row = {**measure(name, params, test, owner, train, seed, tags), "split": args.split}
            rows.append(row)
            print(f"{name:20s} seed {seed} {row['steps']:5d} steps {row['seconds']:6.0f}s  IR@1/5/10 "
                  f"{100 * row['image_retrieval_r1']:.1f}/{100 * row['image_retrieval_r5']:.1f}/"
                  f"{100 * row['image_retrieval_r10']:.1f}  TR@1/5/10 {100 * row['text_retrieval_r1']:.1f}/"
                  f"{100 * row['text_retrieval_r5']:.1f}/{100 * row['text_retrieval_r10']:.1f}  L0 "
                  f"{row['l0_image_pct']:.1f}%/{row['l0_text_pct']:.1f}%  dead {row['dead_pct']:.0f}%  "
                  f"tagging {row.get('tagging_auroc', float('nan')):.3f}  "
                  f"scale {row['logit_scale']:.1f}", flush=True)
    spread = seed_spread(rows)
    for name, stats in spread.items():
        print(f"{name:20s} over {stats['seeds']} seeds: " + "  ".join(
            f"{key} {100 * stats[key]['mean']:.1f} ± {100 * stats[key]['sd']:.1f}" for key in SCORES if key in stats))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "flickr8k_heads.json"
    record = json.loads(out.read_text()) if out.is_file() else {}
    ran = {(r["setting"], r["seed"], r["split"]) for r in rows}
    kept = [r for r in record.get("rows", []) if (r["setting"], r.get("seed", 0), r.get("split", "test")) not in ran]
    out.write_text(json.dumps({"command": "python -m benchmarks.flickr8k_heads --workspace ../main-flickr8k",
                               "machine": "2 CPU cores", "rows": kept + rows,
                               "seed_spread": {**record.get("seed_spread", {}), **spread}}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
