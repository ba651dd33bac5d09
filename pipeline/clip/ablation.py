"""The paper's small-scale ablation (§2.2, Fig 2a-c) as one reproducible sweep.

Each *point* is a short training of the base model (``train.model`` + ``train.optim``, the same
recipe and code as the Ray Train stage: :func:`pipeline.clip.train.train_in_process`) with one choice
changed, once per seed and per *recipe*: ``paper`` trains every point with the paper's heads (torch's
init, the towers' learning rate), ``embedded`` every point with the embedded run's sparsity knobs
(``train.model.head_bias_init``, ``train.optim.head_lr_multiplier``; a TopK head keeps torch's
init, see :func:`point_model`), so under the paper's recipe no line differs from another in a
knob the panel does not name.

- **Fig 2a** (``expansion``): head width x {``expansions``} with ``relu`` and with ``none``. The paper:
  accuracy and sparsity grow with width only under non-negativity; without it every feature fires.
- **Fig 2b** (``activation``): ``relu`` vs ``topk`` vs ``l1`` at the base width, L0 and accuracy
  against steps. The paper: ReLU sparsifies gradually and ends more accurate.
- **Fig 2c** (``scale``): the logit scale's cap (or a scale fixed at it) over ``scale_caps``. The
  paper: a lower cap gives a lower L0, and accuracy falls once the cap is too low (20 for ViT-B/32).

Points run as Ray tasks side by side (``task_cpus`` each), on the train split decoded once and
shared through Ray's object store; every point scores the same val images. Accuracy is the mean
top-1 zero-shot accuracy over the dataset's labelled tasks (the paper: ImageNet top-1; for data
without such tasks, e.g. Flickr8k, the mean val retrieval R@5), and L0 is
the mean number of non-zero features per input over the last logging window, in % of the width.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import AblationParams, ModelParams, Params, TrainParams
from pipeline.plots import panel_row, save_figure

log = logging.getLogger(__name__)

PANELS = {
    "expansion": "Fig 2a: non-negativity x expansion",
    "activation": "Fig 2b: ReLU vs TopK vs L1",
    "scale": "Fig 2c: logit scale cap",
}


@dataclass(frozen=True)
class Point:
    """One training of the sweep: ``panel``'s line ``label`` at ``x``, with ``overrides`` of train.model."""

    panel: str
    label: str
    x: float
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    recipe: str = "paper"

    @property
    def line(self) -> str:
        """The figure's line: the panel's choice under one recipe."""
        return line_name(self.label, self.recipe)

    @property
    def name(self) -> str:
        return f"{self.panel}/{self.line}/{self.x:g}/seed{self.seed}"


def line_name(label: str, recipe: str) -> str:
    """``relu_paper``: a name MLflow takes inside a metric key (no spaces or brackets)."""
    return f"{label}_{recipe}"


def grid(params: AblationParams) -> list[Point]:
    """Every point of the three panels, for every seed."""
    points = []
    for recipe in params.recipes:
        for seed in params.seeds:
            for activation in params.expansion_activations:
                for expansion in params.expansions:
                    points.append(Point("expansion", activation, expansion, seed,
                                        {"expansion": expansion, "activation": activation}, recipe))
            for activation in params.activations:
                points.append(Point("activation", activation, 0, seed, {"activation": activation}, recipe))
            for cap in params.scale_caps:
                points.append(Point("scale", params.scale_mode, cap, seed, {
                    "logit_scale_cap": cap, "logit_scale_mode": params.scale_mode,
                    # a fixed scale is held at the cap; a learnable one starts at open_clip's value (<= cap)
                    **({"init_logit_scale": None} if params.scale_mode == "fixed" else {})}, recipe))
    return points


def point_model(base: ModelParams, point: Point) -> ModelParams:
    """The base model with the point's overrides. The paper's recipe starts every head's biases at
    torch's init; the embedded one at ``head_bias_init``, except a TopK head's: ReLU(TopK) of
    pre-activations that all start below 0 is all-zero with no gradient (ModelParams refuses it),
    so TopK keeps torch's init there -- the one knob that differs between lines, and only under
    the embedded recipe."""
    merged = {**base.model_dump(), **point.overrides}
    if point.recipe == "paper" or (merged["activation"] == "topk" and (merged["head_bias_init"] or 0.0) < 0):
        merged["head_bias_init"] = None
    return ModelParams.model_validate(merged)


def point_train_params(train: TrainParams, params: AblationParams, recipe: str = "paper") -> TrainParams:
    """The stage's training params with the sweep's batch and logging cadence; under the paper's
    recipe the heads learn at the towers' rate."""
    optim = train.optim.model_copy(update={"head_lr_multiplier": 1.0}) if recipe == "paper" else train.optim
    return train.model_copy(update={"global_batch_size": params.batch_size, "log_every": params.log_every,
                                    "eval_every": params.eval_every, "num_workers": 1, "optim": optim})


def run_point(point: Point, base: ModelParams, train: TrainParams, params: AblationParams,
              data: dict[str, np.ndarray], val: dict[str, Any]) -> dict[str, Any]:
    """Train one point in this process; its curves and final values."""
    import torch

    from pipeline.clip.recipe import train_in_process

    torch.set_num_threads(params.threads_per_task)
    device = torch.device("cuda" if params.use_gpu and torch.cuda.is_available() else "cpu")
    model_params = point_model(base, point)
    model, curves = train_in_process(model_params, point_train_params(train, params, point.recipe), data, val,
                                     params.steps, point.seed, device)
    return {**asdict(point), "line": point.line, "name": point.name, "width": model.width, "curves": curves,
            "final": final_values(curves)}


def final_values(curves: dict[int, dict[str, float]]) -> dict[str, float]:
    """The last value of every metric, with ``accuracy``: the mean top-1 zero-shot over the tasks,
    or, for data without zero-shot tasks (real photos), the mean val retrieval R@5 of both directions."""
    last: dict[str, float] = {}
    for step in sorted(curves):
        last.update(curves[step])
    if (accuracy := _accuracy(last)) is not None:
        last["accuracy"] = accuracy
    return last


def _accuracy(metrics: dict[str, float]) -> float | None:
    top1 = [v for k, v in metrics.items() if k.startswith("zeroshot/") and k.endswith("/top1")]
    recall = [v for k, v in metrics.items() if k.startswith("val/") and k.endswith("_r5")]
    return float(np.mean(top1 or recall)) if (top1 or recall) else None


def run_ablation(params: Params, data_dir: str | Path) -> list[dict[str, Any]]:
    """Every point of :func:`grid`, as Ray tasks on the decoded train split; results in grid order."""
    import ray
    from tqdm import tqdm

    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import load_val
    from pipeline.runtime.cluster import connect
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    ablation = params.ablation
    points = grid(ablation)
    probe = build_model(params.train.model)
    preprocessor = ClipBatchPreprocessor.for_model(probe)
    arrays, _ = load_split_arrays(data_dir, "train", preprocessor)
    val = load_val(str(data_dir), preprocessor, limit=ablation.val_images)
    connect(params.ray)
    data_ref, val_ref = ray.put({k: arrays[k] for k in ("image", "text")}), ray.put(val)
    task = ray.remote(num_cpus=ablation.task_cpus, num_gpus=1 if ablation.use_gpu else 0)(run_point)
    pending = {task.remote(p, params.train.model, params.train, ablation, data_ref, val_ref): i
               for i, p in enumerate(points)}
    results: list[dict[str, Any] | None] = [None] * len(points)
    with tqdm(total=len(points), desc="ablation points", unit="point") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            results[index] = ray.get(done[0])
            final = results[index]["final"]
            bar.set_postfix_str(f"{points[index].name}: L0 {final.get('train/l0_image_pct', float('nan')):.1f}% "
                                f"acc {final.get('accuracy', float('nan')):.2f}")
            bar.update()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- summaries


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per panel, line and x: the mean and standard deviation over seeds of each final value."""
    keys = ("train/l0_image_pct", "train/l0_text_pct", "train/l0_image", "train/dead_fraction",
            "train/logit_scale", "accuracy", "val/image_retrieval_r5", "val/text_retrieval_r5")
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["panel"], result["line"], result["x"])].append(result)
    summary: dict[str, Any] = {panel: {} for panel in PANELS}
    for (panel, label, x), members in sorted(groups.items()):
        row: dict[str, Any] = {"x": x, "width": members[0]["width"], "seeds": [m["seed"] for m in members]}
        for key in keys:
            values = [m["final"][key] for m in members if key in m["final"]]
            if values:
                row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        summary[panel].setdefault(label, []).append(row)
    return summary


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Seed means as flat, named numbers (MLflow, DVC metrics)."""
    out = {}
    for panel, lines in summary.items():
        for label, rows in lines.items():
            for row in rows:
                for key in ("train/l0_image_pct", "train/l0_text_pct", "accuracy", "train/dead_fraction",
                            "train/logit_scale"):
                    if key in row:
                        out[f"{panel}.{label}.{row['x']:g}.{key.split('/')[-1]}"] = row[key]["mean"]
    return out


def trend_checks(summary: dict[str, Any], recipes: list[str]) -> dict[str, Any]:
    """Does each of the paper's observations hold here, under each recipe? Plain comparisons of
    seed means, keyed ``<recipe>.<check>``."""
    checks: dict[str, Any] = {}
    for recipe in recipes:
        lines = {panel: {label.removesuffix(f"_{recipe}"): rows for label, rows in panel_lines.items()
                         if label.endswith(f"_{recipe}")} for panel, panel_lines in summary.items()}
        checks.update({f"{recipe}.{k}": v for k, v in _checks(lines).items()})
    return checks


def _checks(summary: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    expansion = summary.get("expansion", {})
    if "relu" in expansion and "none" in expansion and len(expansion["relu"]) > 1:
        relu, none = expansion["relu"], expansion["none"]
        checks["2a_relu_active_pct_falls_with_width"] = _mean(relu[-1], "train/l0_image_pct") < _mean(
            relu[0], "train/l0_image_pct")
        checks["2a_none_stays_dense"] = min(_mean(r, "train/l0_image_pct") for r in none) > 90.0
        checks["2a_relu_accuracy_grows_with_width"] = _mean(relu[-1], "accuracy") > _mean(relu[0], "accuracy")
    activation = summary.get("activation", {})
    if "relu" in activation:
        relu_acc = _mean(activation["relu"][0], "accuracy")
        for other in ("topk", "l1"):
            if other in activation:
                checks[f"2b_relu_more_accurate_than_{other}"] = relu_acc > _mean(activation[other][0], "accuracy")
    scale = next(iter(summary.get("scale", {}).values()), [])
    if len(scale) > 1:
        l0 = [_mean(r, "train/l0_image_pct") for r in scale]
        checks["2c_l0_rises_with_cap_spearman"] = float(_spearman([r["x"] for r in scale], l0))
    return checks


def _mean(row: dict[str, Any], key: str) -> float:
    return row[key]["mean"] if key in row else float("nan")


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation with tied values given their average rank: caps that never
    bind give equal L0s, and breaking those ties by position would invent a trend."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


# --------------------------------------------------------------------------- figures


def plot_panels(summary: dict[str, Any], results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """The paper's three panels as PNGs, seed means with +-1 std bands (or error bars)."""
    out_dir = Path(out_dir)
    paths = []
    if summary.get("expansion"):
        fig, (acc, l0) = panel_row(2)
        for label, rows in summary["expansion"].items():
            widths = [r["width"] for r in rows]
            _errorbar(acc, widths, rows, "accuracy", label)
            _errorbar(l0, widths, rows, "train/l0_image", label)
        _style(acc, "embedding width", "accuracy (val)", log_x=True)
        _style(l0, "embedding width", "active features per image (L0)", log_x=True)
        paths.append(save_figure(fig, out_dir / "fig2a_expansion.png", PANELS["expansion"]))
    if summary.get("activation"):
        fig, (l0, acc) = panel_row(2)
        for label in summary["activation"]:
            members = [r for r in results if r["panel"] == "activation" and r["line"] == label]
            _band(l0, members, "train/l0_image_pct", label)
            _band(acc, members, "accuracy", label)
        _style(l0, "step", "L0 (% of width)")
        _style(acc, "step", "accuracy (val)")
        paths.append(save_figure(fig, out_dir / "fig2b_activation.png", PANELS["activation"]))
    if summary.get("scale"):
        fig, (l0, acc) = panel_row(2)
        for label, rows in summary["scale"].items():
            caps = [r["x"] for r in rows]
            _errorbar(l0, caps, rows, "train/l0_image_pct", f"{label} scale")
            _errorbar(acc, caps, rows, "accuracy", f"{label} scale")
        _style(l0, "logit scale cap", "L0 (% of width)", log_x=True)
        _style(acc, "logit scale cap", "accuracy (val)", log_x=True)
        paths.append(save_figure(fig, out_dir / "fig2c_scale.png", PANELS["scale"]))
    return paths


def _errorbar(ax, xs, rows, key, label) -> None:
    means = [_mean(r, key) for r in rows]
    stds = [r[key]["std"] if key in r else 0.0 for r in rows]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)


def _band(ax, members: list[dict[str, Any]], key: str, label: str) -> None:
    """Mean curve over seeds with a +-1 std band."""
    series = [_series(m["curves"], key) for m in members]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return
    values = np.array([[s[step] for step in steps] for s in series])
    mean, std = values.mean(0), values.std(0)
    (line,) = ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _series(curves: dict[int, dict[str, float]], key: str) -> dict[int, float]:
    """One metric against the step; ``accuracy`` as :func:`final_values` defines it."""
    out = {}
    for step, metrics in curves.items():
        value = _accuracy(metrics) if key == "accuracy" else metrics.get(key)
        if value is not None:
            out[int(step)] = value
    return out


def _style(ax, xlabel: str, ylabel: str, log_x: bool = False) -> None:
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
