"""Which image tower teaches the embedded CLIP its data on 2 cores: every concept family, against time.

The embedded run's first models learned colour and little else (shape zero-shot near chance).
This trains each setting with the pipeline's own recipe (:func:`pipeline.clip.train.train_in_process`:
the Ray Train step, in one process) on the sampled embedded data, the batch of ``params.yaml``'s
``train`` section, for ``--steps`` (default: the run's own, epochs x steps per epoch), and scores on
the val split, every ``--eval-every`` steps, zero-shot top-1 of each concept family the generator
draws (shape, colour, size, position, background, count, rendered word) and image->text R@1, each
curve against the seconds trained. The towers are open_clip's own: the inline ViT and the
ModifiedResNet (a convolutional tower with an attention pool, ``vision_cfg.layers`` a list), and,
as a reference that is not trained from scratch, the packaged ImageNet EfficientNet-lite0 at 64 px
(its own pixel normalisation: such a setting reads its images decoded for it).

    python -m benchmarks.tower_levers                          # after the sample stage (data/sample)
    python -m benchmarks.tower_levers --only ViT --steps 1000  # a longer curve for some settings

Prints one row per setting and writes ``benchmarks/results/tower_levers[_<tag>].{json,png}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.sparsity_tradeoff import parse_overrides, selected, settings_parser

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ("shape", "colour", "size", "position", "background", "count", "word")

VIT = {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 4.0}
RESNET = {"image_size": 64, "layers": [1, 1, 1, 1], "head_width": 16}
TOWER = "train.model.inline.vision_cfg"
# the packaged ImageNet tower (pipeline.clip.towers) at the data's own size, fine-tuned: not from scratch
LITE0 = {"train.model.towers.image": "efficientnet-lite0", "train.model.towers.image_size": 64}

# name -> params overrides; "variant" picks the train.variants entry (dense: the baseline)
SETTINGS: dict[str, dict] = {
    "ViT 8-px patches, dense (the earlier default)": {"variant": "dense", TOWER: VIT},
    "ViT 4-px patches, dense": {"variant": "dense", TOWER: {**VIT, "patch_size": 4}},
    "ModifiedResNet width 8, dense": {"variant": "dense", TOWER: {**RESNET, "width": 8, "head_width": 8}},
    "ModifiedResNet width 16, dense (default)": {"variant": "dense", TOWER: {**RESNET, "width": 16}},
    "ModifiedResNet width 16, dense, lr 2e-3": {"variant": "dense", TOWER: {**RESNET, "width": 16},
                                                "train.optim.lr": 2e-3},
    "ViT 8-px patches, sparse": {"variant": "sparse", TOWER: VIT},
    "ModifiedResNet width 16, sparse (default)": {"variant": "sparse", TOWER: {**RESNET, "width": 16}},
    "EfficientNet-lite0 at 64 px, ImageNet weights, dense": {"variant": "dense", **LITE0},
    "EfficientNet-lite0 at 64 px, ImageNet weights, its last 3 groups train, dense": {
        "variant": "dense", **LITE0, "train.model.lock.image": True, "train.model.lock.image_unlocked_groups": 3},
}


def measure(name: str, overrides: dict, params_path: str, arrays: dict, val: dict, steps: int | None,
            eval_every: int, base_overrides: dict, batches=None) -> dict:
    """Train one setting; its curves (step, training seconds, each family's top-1, R@1).
    ``batches``: the epoch's batch order (:func:`pipeline.clip.train.train_in_process`'s hook)."""
    from pipeline.clip.recipe import train_in_process
    from pipeline.config import load_params

    overrides = dict(overrides)
    variant = overrides.pop("variant")
    params = load_params(params_path, overrides={**base_overrides, **overrides, "train.eval_every": eval_every})
    train = params.train
    steps = steps or (len(arrays["text"]) // train.global_batch_size) * train.epochs
    _, curves = train_in_process(train.model_for(variant), train, arrays, val, steps, seed=0, batches=batches)
    points = [{"step": step, "seconds": round(m["train/seconds"], 1), "loss": m.get("train/loss"),
               **{f: m.get(f"zeroshot/{f}/top1") for f in FAMILIES}, "image_r1": m.get("val/image_retrieval_r1"),
               "l0_image_pct": m.get("train/l0_image_pct")}
              for step, m in sorted(curves.items()) if "zeroshot/shape/top1" in m]
    return {"setting": name, "variant": variant, "overrides": overrides, "params_overrides": base_overrides,
            "steps": steps, "batch": train.global_batch_size, "final": points[-1], "curve": points}


def chance(labels: list[str]) -> float:
    """The share of the most common class: what a constant answer scores."""
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / counts.sum())


def chance_levels(val: dict) -> dict[str, float]:
    """Each family's chance on the val images scored."""
    out = {}
    for family, labels in val["labels"].items():
        present = [label for label in labels if label is not None]
        out[family] = chance(present) if present else float("nan")
    return out


def plot(rows: list[dict], chance: dict[str, float], path: Path) -> None:
    from pipeline.plots import panel_row, save_figure

    panels = ["shape", "colour", "count", "image_r1"]
    fig, axes = panel_row(len(panels), width=4.5)
    for ax, key in zip(axes, panels):
        for row in rows:
            curve = row["curve"]
            ax.plot([p["seconds"] for p in curve], [p[key] for p in curve], marker=".", label=row["setting"])
        if key in chance:
            ax.axhline(chance[key], color="grey", ls=":", label="chance")
        ax.set(xlabel="training seconds (2 cores, evaluations excluded)", ylabel=f"val {key} top-1"
               if key != "image_r1" else "val image->text R@1", title=key)
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


def print_row(row: dict, width: int) -> None:
    """One setting's final numbers on one line."""
    final = row["final"]
    print(f"{row['setting']:{width}s} {row['steps']} steps {final['seconds']:5.0f} s  " + "  ".join(
        f"{f} {final[f]:.2f}" for f in FAMILIES) + f"  R@1 {final['image_r1'] or float('nan'):.3f}", flush=True)


def write_results(stem: str, rows: list[dict], chance: dict, val: dict, threads: int, tag: str | None) -> None:
    """``benchmarks/results/<stem>[_<tag>].json`` and its curves' PNG."""
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{tag}" if tag else ""
    payload = {"chance": chance, "val_images": len(val["texts"]), "threads": threads, "settings": rows}
    (RESULTS / f"{stem}{suffix}.json").write_text(json.dumps(payload, indent=1))
    plot(rows, chance, RESULTS / f"{stem}{suffix}.png")


def main() -> None:
    import torch

    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import load_val
    from pipeline.config import load_params
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    parser = settings_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per setting (default: the run's)")
    parser.add_argument("--eval-every", type=int, default=56, help="steps between val evaluations")
    parser.add_argument("--tag", default=None, help="results file suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = parse_overrides(args.set)
    decoded: dict[tuple, tuple[dict, dict]] = {}

    def inputs(setting: dict) -> tuple[dict, dict]:
        """The train arrays and val set as this setting's model reads them, decoded once per input format."""
        params = load_params(args.params, overrides={**overrides, **{k: v for k, v in setting.items() if k != "variant"}})
        preprocessor = ClipBatchPreprocessor.for_model(build_model(params.train.model))
        key = (preprocessor.size, tuple(preprocessor.mean), tuple(preprocessor.std))
        if key not in decoded:
            arrays, _ = load_split_arrays(params.sample.out_dir, "train", preprocessor)
            decoded[key] = arrays, load_val(params.sample.out_dir, preprocessor, limit=1000)
        return decoded[key]

    rows, chance = [], None
    for name, setting in selected(SETTINGS, args.only).items():
        arrays, val = inputs(setting)
        chance = chance or chance_levels(val)
        row = measure(name, setting, args.params, arrays, val, args.steps, args.eval_every, overrides)
        rows.append(row)
        print_row(row, width=46)
    write_results("tower_levers", rows, chance, val, args.threads, args.tag)


if __name__ == "__main__":
    main()
