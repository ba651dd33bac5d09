"""Curves as files people can look at: a CSV for DVC plots and a PNG for everyone else
(``dvc plots show`` renders HTML that pulls Vega from a CDN, which offline readers lack)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_curve_csv(rows: Mapping[int, Mapping[str, float]], path: str | Path) -> Path:
    """{step: {metric: value}} -> CSV with a ``step`` column and one column per metric."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({name for values in rows.values() for name in values})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *columns])
        for step, values in rows.items():
            writer.writerow([step, *(values.get(c, "") for c in columns)])
    return path


def panel_row(panels: int, width: float = 4.2):
    """A figure with one row of ``panels`` axes, ``width`` inches each: (figure, axes)."""
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 3.4), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    """Title it, lay it out, write the PNG (making its folder) and free the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(rows: Mapping[int, Mapping[str, float]], panels: Sequence[Sequence[str]], path: str | Path,
                title: str = "", xlabel: str = "step") -> Path:
    """One subplot per panel (a list of metric names sharing axes) against the row key."""
    fig, axes = panel_row(len(panels))
    for ax, names in zip(axes, panels):
        for name in names:
            points = [(s, v[name]) for s, v in rows.items() if name in v]
            if points:
                ax.plot(*zip(*points), label=name.split("/", 1)[-1], marker="." if len(points) < 30 else None)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    return save_figure(fig, path, title)
