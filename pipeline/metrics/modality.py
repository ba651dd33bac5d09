"""Modality of features (paper §3.1, Fig 3b; method of Papadimitriou et al. 2025): does a
feature fire for images, for text, or for both?

A feature's modality score is the image share of its activation mass, each modality's mass
normalised by its number of rows so a caption-heavy evaluation set does not tilt it:

    m_i = mean_img u_i / (mean_img u_i + mean_txt u_i)     (1 image-only, 0 text-only, ~0.5 both)

where u = a / ||a|| is each input's activation vector at unit L2 norm: what the contrastive loss
compares. The raw norms of the two towers are free (the loss never sees them), so a score on raw
mass would follow an arbitrary rescaling of one tower (x10 on the image tower made every feature
"image-only"); on unit rows it cannot. The summary's thresholds (image-only above 0.9, text-only
below 0.1) are ours; the paper shows the distribution (Fig 3b) without naming cut-offs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._arrays import as_csr, unit_positive_column_sums


def modality_scores(image_activations, text_activations) -> np.ndarray:
    """[F] modality score per feature from image (n_img x F) and text (n_txt x F) activations;
    NaN for features that fire in neither modality."""
    images, texts = as_csr(image_activations), as_csr(text_activations)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image and text activations differ in width: {images.shape[1]} vs {texts.shape[1]}")
    # the unit rows' column sums, a block of rows at a time: no unit-row copy of either matrix
    image_mean = unit_positive_column_sums(images) / images.shape[0]
    text_mean = unit_positive_column_sums(texts) / texts.shape[0]
    total = image_mean + text_mean
    return np.divide(image_mean, total, out=np.full(total.shape, np.nan), where=total > 0)


def modality_summary(scores, low: float = 0.1, high: float = 0.9) -> dict:
    """Fractions of the scored (non-NaN) features that are image-only (> high), text-only
    (< low) and multimodal (in between, inclusive), plus their count ``n_features``.
    The paper's headline is that Sparse CLIP is dominated by multimodal features."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = scores[~np.isnan(scores)]
    if scored.size == 0:
        return {"image_only": float("nan"), "text_only": float("nan"), "multimodal": float("nan"), "n_features": 0}
    return {
        "image_only": float((scored > high).mean()),
        "text_only": float((scored < low).mean()),
        "multimodal": float(((scored >= low) & (scored <= high)).mean()),
        "n_features": int(scored.size),
    }


def plot_modality_density(scores, density, path, title: str = "") -> Path:
    """Fig 3b as a PNG: 2-D histogram of modality score (x, [0, 1]) against log10 feature
    density (y; see :func:`pipeline.metrics.sparsity.feature_density`), with the marginal
    modality histogram on top. Features with NaN score or zero density are left out.

    Uses a bare Agg canvas rather than pyplot, so it touches no global matplotlib state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    keep = ~np.isnan(scores) & (density > 0)
    x, y = scores[keep], np.log10(density[keep])
    y_range = (float(y.min()) - 0.1, float(y.max()) + 0.1) if y.size else (-6.0, 0.0)

    figure = Figure(figsize=(6, 6), layout="constrained")
    FigureCanvasAgg(figure)
    top, main = figure.subplots(2, 1, sharex=True, height_ratios=[1, 3])
    top.hist(x, bins=50, range=(0.0, 1.0), color="tab:gray")
    top.set_ylabel("features")
    top.set_title(title or f"{x.size} features")
    if x.size:  # a log colour scale of an empty histogram has no range
        *_, image = main.hist2d(x, y, bins=(50, 40), range=((0.0, 1.0), y_range), cmin=1, norm=LogNorm())
        figure.colorbar(image, ax=main, label="features")
    main.set_xlim(0.0, 1.0)
    main.set_ylim(*y_range)
    main.set_xlabel("modality score (0 = text only, 1 = image only)")
    main.set_ylabel("log10 activation density")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
