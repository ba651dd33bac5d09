"""What the embedded image tower can learn of each concept family when it is told: a supervised ceiling.

Zero-shot accuracy asks whether contrastive training on captions taught a family; the linear probe
(:mod:`benchmarks.linear_probe`) whether a trained model's image embedding holds it. Neither says
whether the tower *could* learn it. This trains the image tower the run's params build (random
init, the variant's own ``vision_cfg``: the ModifiedResNet at 64 px by default) and a linear
classifier with cross-entropy on one family's labels -- the main object's shape, colour, size or
3x3 grid position, the object count, the background, the rendered word -- a fresh tower per family,
and scores it on the val split every ``--eval-every`` steps. A family the tower learns with labels
and CLIP does not is one the captions do not teach; one it cannot learn even so is the tower's (or
the image size's) limit, and no caption, batch or temperature lever will recover it.

    python -m benchmarks.supervised_ceiling                         # after the sample stage
    python -m benchmarks.supervised_ceiling --families position --steps 1200

Prints one row per family and writes ``benchmarks/results/supervised_ceiling[_<tag>].{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.linear_probe import labelled
from benchmarks.tower_levers import FAMILIES, RESULTS, chance


def train_family(tower_factory, train: tuple[np.ndarray, list[str]], val: tuple[np.ndarray, list[str]],
                 steps: int, batch: int, lr: float, eval_every: int, seed: int) -> list[dict]:
    """A fresh tower + linear classifier trained on one family; its val accuracy curve."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    classes = sorted(set(train[1]) | set(val[1]))
    index = {c: i for i, c in enumerate(classes)}
    x, y = torch.as_tensor(train[0]), torch.tensor([index[c] for c in train[1]])
    vx, vy = torch.as_tensor(val[0]), torch.tensor([index[c] for c in val[1]])
    tower, width = tower_factory()
    model = torch.nn.Sequential(tower, torch.nn.Linear(width, len(classes)))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    curve, seconds = [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        model.train()
        for group in optimiser.param_groups:  # linear warmup, then constant: a ceiling, not a schedule study
            group["lr"] = lr * min(1.0, step / 25)
        rows = torch.randint(0, len(y), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seconds += time.perf_counter() - started
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                predicted = torch.cat([model(vx[i:i + 256]).argmax(1) for i in range(0, len(vx), 256)])
            curve.append({"step": step, "seconds": round(seconds, 1), "loss": round(loss.item(), 4),
                          "accuracy": float((predicted == vy).float().mean())})
    return curve


def plot(rows: list[dict], path: Path) -> None:
    from pipeline.plots import panel_row, save_figure

    fig, (ax,) = panel_row(1, width=6)
    for row in rows:
        line, = ax.plot([p["step"] for p in row["curve"]], [p["accuracy"] for p in row["curve"]],
                        marker=".", label=row["family"])
        ax.axhline(row["chance"], color=line.get_color(), ls=":", lw=0.8)
    ax.set(xlabel="steps (cross-entropy on the family's labels)", ylabel="val accuracy",
           title="the image tower, supervised (dotted: chance)", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    import torch

    from pipeline.clip.model import build_model
    from pipeline.config import load_params
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", default="dense", help="the train.variants entry whose image tower is built")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default=None, help="results file suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = load_params(args.params)
    model_params = params.train.model_for(args.variant)
    preprocessor = ClipBatchPreprocessor.for_model(build_model(model_params))
    train_arrays, train_metas = load_split_arrays(params.sample.out_dir, "train", preprocessor)
    val_arrays, val_metas = load_split_arrays(params.sample.out_dir, "val", preprocessor)

    def tower_factory():
        clip = build_model(model_params).clip
        clip.visual.output_tokens = False
        return clip.visual, int(clip.visual.output_dim)

    rows = []
    for family in args.families:
        train = labelled(train_arrays["image"], train_metas, family)
        val = labelled(val_arrays["image"], val_metas, family)
        curve = train_family(tower_factory, train, val, args.steps, params.train.global_batch_size, args.lr,
                             args.eval_every, args.seed)
        row = {"family": family, "classes": len(set(train[1])), "train_images": len(train[1]),
               "val_images": len(val[1]), "chance": chance(val[1]), "final": curve[-1]["accuracy"], "curve": curve}
        rows.append(row)
        print(f"{family:10s} {row['classes']:2d} classes  val accuracy {row['final']:.3f} "
              f"(chance {row['chance']:.3f})  {curve[-1]['seconds']:.0f} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = f"supervised_ceiling{'_' + args.tag if args.tag else ''}"
    payload = {"command": "python -m benchmarks.supervised_ceiling", "variant": args.variant,
               "steps": args.steps, "batch": params.train.global_batch_size, "lr": args.lr,
               "threads": args.threads, "families": rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(rows, RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
