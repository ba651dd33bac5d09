"""Sparsity against dead features and accuracy, for each setting of the sparsity knobs.

The embedded run's targets pull against each other: the knobs that make the wide heads sparse in
~340 CPU steps (a negative head-bias start, a faster head, a lower logit-scale cap) also leave
features that never fire. This trains each setting with the pipeline's own recipe
(:func:`pipeline.clip.train.train_in_process`: the Ray Train step, in one process) on the sampled
embedded data for the same steps and batch as ``params.yaml``'s ``train`` section, and measures on
the test split what the metrics stage reports: L0 (% of the width), the dead fraction (features
that fire on no test image / caption), colour zero-shot top-1 and val retrieval R@5.

    python -m benchmarks.sparsity_tradeoff              # after the sample stage (data/sample)
    python -m benchmarks.sparsity_tradeoff --only cap8  # the settings whose name contains "cap8"

    # real photos, by params override: Flickr8k sampled into its own folder on first use
    python -m benchmarks.sparsity_tradeoff --tag flickr8k --only default --only dense \
        --set sample.source.kind=csv --set sample.source.path=../shared/data/flickr8k/captions.csv \
        --set sample.source.image_root=../shared/data/flickr8k/images --set sample.out_dir=data/flickr8k

    # the dead-feature account (docs/findings.md): the same 41 concepts, one object per image
    python -m benchmarks.sparsity_tradeoff --tag one_object --only "cap 8 (default" \
        --only "-0.5, head x10, cap 15" --set sample.source.generator.max_objects=1 \
        --set sample.out_dir=data/gen_one_object

Prints one row per setting and writes ``benchmarks/results/sparsity_tradeoff[_<tag>].{json,png}``.
Sources without zero-shot tasks (Flickr8k) report retrieval only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> params.yaml overrides, applied to the `sparse` variant (dense: the baseline itself)
SETTINGS: dict[str, dict] = {
    "dense": {"variant": "dense"},
    "the paper's recipe (bias torch, head x1, cap 50)": {"train.model.head_bias_init": None,
                                                         "train.optim.head_lr_multiplier": 1.0,
                                                         "train.variants.sparse.logit_scale_cap": 50},
    "bias torch, head x10, cap 15": {"train.model.head_bias_init": None, "train.variants.sparse.logit_scale_cap": 15},
    "bias torch, head x30, cap 15": {"train.model.head_bias_init": None, "train.optim.head_lr_multiplier": 30.0,
                                     "train.variants.sparse.logit_scale_cap": 15},
    "bias torch, head x10, cap 5": {"train.model.head_bias_init": None, "train.variants.sparse.logit_scale_cap": 5},
    "bias -0.25, head x10, cap 15": {"train.model.head_bias_init": -0.25, "train.variants.sparse.logit_scale_cap": 15},
    "bias -0.5, head x10, cap 15": {"train.variants.sparse.logit_scale_cap": 15},
    "bias -0.5, head x10, cap 10": {"train.variants.sparse.logit_scale_cap": 10},
    "bias -0.5, head x10, cap 8 (default sparse)": {},
    "bias -0.5, head x10, cap 6 (default sparse_plus)": {"train.variants.sparse.logit_scale_cap": 6},
    "bias -0.5, head x10, cap 5": {"train.variants.sparse.logit_scale_cap": 5},
}


def measure(name: str, overrides: dict, params_path: str, arrays: dict, val: dict, seed: int,
            base_overrides: dict | None = None) -> dict:
    """Train one setting; its sparsity, dead fraction and accuracy on the test split, counted as the
    metrics stage counts them (:func:`pipeline.metrics.sparsity_summary`)."""
    import torch

    from pipeline.clip.recipe import train_in_process
    from pipeline.config import load_params
    from pipeline.metrics import sparsity_summary

    overrides = dict(overrides)
    variant = overrides.pop("variant", "sparse")
    params = load_params(params_path, overrides={**(base_overrides or {}), **overrides})
    train = params.train
    steps = (len(arrays["train"]["text"]) // train.global_batch_size) * train.epochs
    start = time.perf_counter()
    model, curves = train_in_process(train.model_for(variant), train, arrays["train"], val, steps, seed)
    with torch.no_grad():
        image = sparsity_summary(model.encode_image(torch.as_tensor(arrays["test"]["image"])).numpy())
        text = sparsity_summary(model.encode_text(torch.as_tensor(arrays["test"]["text"])).numpy())
    last = curves[max(curves)]
    return {
        "setting": name, "overrides": overrides, "params_overrides": base_overrides or {}, "variant": variant,
        "steps": steps,
        "batch": train.global_batch_size, "seconds": round(time.perf_counter() - start, 1),
        "l0_image_pct": image["l0_pct"], "l0_text_pct": text["l0_pct"],
        "dead_image": image["dead_fraction"], "dead_text": text["dead_fraction"],
        "colour_top1": last.get("zeroshot/colour/top1"), "image_r5": last.get("val/image_retrieval_r5"),
        "text_r5": last.get("val/text_retrieval_r5"), "logit_scale": last.get("train/logit_scale"),
    }


def plot(rows: list[dict], path: Path) -> None:
    from pipeline.plots import panel_row, save_figure

    fig, (ax,) = panel_row(1, width=7.0)
    for row in rows:
        if row["variant"] == "dense":
            continue
        ax.scatter(row["l0_image_pct"], 100 * row["dead_image"], color="tab:blue")
        ax.annotate(row["setting"], (row["l0_image_pct"], 100 * row["dead_image"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="image L0 (% of width)", ylabel="dead image features (% of width)",
           title="Sparsity vs dead features after the embedded run's steps")
    ax.axvline(5, color="grey", ls=":")
    ax.axhline(10, color="grey", ls=":")
    save_figure(fig, path)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs (values read as YAML, as ``dvc exp run -S`` does) -> overrides."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def settings_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that sweeps named settings over one params file: which file,
    which settings (``--only``), overrides for all of them (``--set``) and torch's threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--only", action="append", default=None,
                        help="run the settings whose name contains this (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key for every setting (repeatable), e.g. another data source")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def selected(settings: dict, only: list[str] | None) -> dict:
    """The settings whose name contains one of ``only`` (all of them without it), in order."""
    return {name: value for name, value in settings.items() if not only or any(part in name for part in only)}


def _fmt(value: float | None, spec: str) -> str:
    return "  -  " if value is None else format(value, spec)


def main() -> None:
    import torch

    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import load_val
    from pipeline.config import load_params
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    parser = settings_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=None, help="results file suffix (default: from --only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = parse_overrides(args.set)
    base = load_params(args.params, overrides=overrides)
    data_dir = base.sample.out_dir
    if not (Path(data_dir) / "manifest.json").is_file():  # sample the overridden source first
        from pipeline.runtime.cluster import connect
        from pipeline.data.sampling import run_sample

        connect(base.ray)
        run_sample(base.sample, base.ray)
    probe = build_model(base.train.model)
    preprocessor = ClipBatchPreprocessor.for_model(probe)
    arrays = {split: load_split_arrays(data_dir, split, preprocessor)[0] for split in ("train", "test")}
    val = load_val(data_dir, preprocessor, limit=2000)
    rows = []
    for name, setting in selected(SETTINGS, args.only).items():
        row = measure(name, setting, args.params, arrays, val, args.seed, overrides)
        rows.append(row)
        print(f"{name:48s} L0 img {row['l0_image_pct']:5.1f}% txt {row['l0_text_pct']:5.1f}%  dead img "
              f"{row['dead_image']:.2f} txt {row['dead_text']:.2f}  colour {_fmt(row['colour_top1'], '.3f')}  R@5 "
              f"{row['image_r5']:.3f}/{row['text_r5']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or ("_".join(args.only) if args.only else "")
    suffix = "_" + "".join(c if c.isalnum() else "_" for c in tag) if tag else ""
    (RESULTS / f"sparsity_tradeoff{suffix}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, RESULTS / f"sparsity_tradeoff{suffix}.png")


if __name__ == "__main__":
    main()
