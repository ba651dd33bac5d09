"""The paper's interpretability figures as PNGs: feature grids (Fig 4, 9), evolution strips
(Fig 5, 10-15) and heatmap panels (supplementary Fig 1). Each takes plain data plus an image
lookup, draws on a bare Agg canvas (no pyplot state) and returns the path it wrote."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLookup = Callable[[str], Image.Image]


def _figure(rows: int, cols: int, cell: float = 1.3, left: float = 0.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(left + cols * cell, 0.3 + rows * cell))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _image_axis(ax, image: Image.Image | None, title: str = "", fontsize: int = 6) -> None:
    if image is not None:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def feature_grid(features: Sequence[Mapping[str, Any]], lookup: ImageLookup, path: str | Path,
                 title: str = "", n_images: int = 6, n_words: int = 5) -> Path:
    """Fig 4: one row per feature, its id, name and top words, then its top images with scores."""
    fig = _figure(len(features), n_images + 2)
    grid = fig.add_gridspec(len(features), n_images + 2)
    for r, feature in enumerate(features):
        text = fig.add_subplot(grid[r, :2])
        text.axis("off")
        words = ", ".join(feature["words"][:n_words])
        text.text(0, 0.5, f"#{feature['feature']}  {feature['name']}\n{words}", fontsize=7, va="center", wrap=True)
        for c in range(n_images):
            ax = fig.add_subplot(grid[r, c + 2])
            has = c < len(feature["images"])
            _image_axis(ax, lookup(feature["images"][c]) if has else None,
                        f"{feature['image_scores'][c]:.2f}" if has else "")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def evolution_strip(features: Sequence[Sequence[Mapping[str, Any]]], lookup: ImageLookup, path: str | Path,
                    title: str = "", n_words: int = 3) -> Path:
    """Fig 5: one row per feature, one column per snapshot; each cell its top image and words."""
    checkpoints = [row["checkpoint"] for row in features[0]]
    fig = _figure(len(features), len(checkpoints), cell=1.5)
    for r, snapshots in enumerate(features):
        for c, row in enumerate(snapshots):
            ax = fig.add_subplot(len(features), len(checkpoints), r * len(checkpoints) + c + 1)
            image = lookup(row["images"][0]) if row["images"] else None
            label = ", ".join(row["words"][:n_words]) or "(silent)"
            _image_axis(ax, image, f"{row['checkpoint']}: {label}" if r == 0 else label)
            if c == 0:
                ax.set_ylabel(f"#{row['feature']}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def overlay(image: Image.Image, heat: np.ndarray) -> np.ndarray:
    """The image with a heatmap (patch grid, upsampled to the image) blended in red."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    scaled = heat / heat.max() if heat.max() > 0 else heat
    up = np.asarray(Image.fromarray((scaled * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)) / 255
    red = np.zeros_like(base)
    red[..., 0] = 1.0
    alpha = 0.65 * up[..., None]
    return (1 - alpha) * base + alpha * red


def heatmap_panel(panels: Sequence[Mapping[str, Any]], lookup: ImageLookup, path: str | Path,
                  title: str = "") -> Path:
    """Supplementary Fig 1: per row an image, then one overlay per model (``heats``: {model: grid}),
    titled with the concept and whether the hottest token hit its box."""
    models = list(panels[0]["heats"])
    fig = _figure(len(panels), len(models) + 1, cell=1.6)
    for r, panel in enumerate(panels):
        image = lookup(panel["key"])
        _image_axis(fig.add_subplot(len(panels), len(models) + 1, r * (len(models) + 1) + 1), image,
                    f"{panel['concept']}" if r else f"image: {panel['concept']}", fontsize=7)
        for c, model in enumerate(models):
            ax = fig.add_subplot(len(panels), len(models) + 1, r * (len(models) + 1) + c + 2)
            hit = panel.get("hits", {}).get(model)
            mark = "" if hit is None else (" hit" if hit else " miss")
            _image_axis(ax, Image.fromarray((overlay(image, panel["heats"][model]) * 255).astype(np.uint8)),
                        f"{model}{mark}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
