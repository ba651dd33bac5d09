"""Training curves of every model overlaid, one figure per quantity: how sparsity (L0), zero-shot
accuracy and the loss evolve with the step, from the train runs' MLflow metric histories."""

from __future__ import annotations

from pathlib import Path

from pipeline.plots import panel_row, save_figure
from pipeline.report.sources import Model

STYLES = ["-", "--", ":", "-."]
FIGURES = {
    "l0": ("L0 (% of width)", ["train/l0_image_pct", "train/l0_text_pct"]),
    "loss": ("training loss", ["train/loss"]),
    "scale": ("dead features and logit scale", ["train/dead_fraction", "train/logit_scale"]),
    "retrieval": ("val retrieval R@5", ["val/image_retrieval_r5", "val/text_retrieval_r5"]),
}


def plot_overlays(models: list[Model], out_dir: str | Path) -> dict[str, Path]:
    """PNG per figure that has data: ``curves_l0.png``, ``curves_zeroshot.png``, ``curves_loss.png``."""
    out_dir = Path(out_dir)
    tasks = sorted({k.split("/")[1] for m in models for k in m.curves if k.startswith("zeroshot/") and k.endswith("/top1")})
    figures = {**FIGURES, "zeroshot": ("zero-shot top-1 (val)", [f"zeroshot/{t}/top1" for t in tasks])}
    written = {}
    for name, (title, keys) in figures.items():
        panels = [k for k in keys if any(k in m.curves for m in models)]
        if panels:
            written[name] = _overlay(models, panels, title, out_dir / f"curves_{name}.png")
    return written


def _overlay(models: list[Model], panels: list[str], title: str, path: Path) -> Path:
    fig, axes = panel_row(len(panels), width=4.6)
    for ax, key in zip(axes, panels):
        drawn = [m for m in models if m.curves.get(key)]
        for i, model in enumerate(drawn):  # dashes and thinning lines keep identical curves visible
            points = model.curves[key]
            ax.plot(*zip(*points), label=model.label, linestyle=STYLES[i % len(STYLES)],
                    linewidth=max(0.8, 2.4 - 0.5 * i), marker="." if len(points) < 30 else None)
        ax.set_title(key.replace("train/", "").replace("zeroshot/", "zero-shot "), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)
