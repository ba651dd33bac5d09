"""Concept steering (paper §4, Fig 8): the top-K features the *text* encoder activates for a
concept word are zeroed (suppress) or set to the steering strength SS (boost) in the sparse
features before the adapter. ``steer(image, suppress=["red"], boost=["blue"])`` is the API;
``python -m pipeline.vlm.steering`` the CLI; :func:`steering_evaluation` the Fig 8b protocol.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.config import Params
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.runtime.cli import run_stage
from pipeline.vlm.evaluate import answer_all, encode_images, p_above, sbert_similarity
from pipeline.vlm.model import FeatureEdit, VisionLanguageModel
from pipeline.vlm.questions import QUESTIONS, normalise


@torch.no_grad()
def concept_features(vlm: VisionLanguageModel, word: str, k: int) -> torch.Tensor:
    """Indices of the k features the text encoder activates most for ``word``."""
    pre = ClipBatchPreprocessor.for_model(vlm.encoder)
    features = vlm.encoder.encode_text(torch.as_tensor(pre.tokens([word])))[0]
    return torch.topk(features, k).indices


class Steerer:
    """A trained VLM plus the concept -> features lookup: answer a question about an image
    with named concepts suppressed and/or boosted."""

    def __init__(self, vlm: VisionLanguageModel):
        self.vlm = vlm
        self.preprocess = ClipBatchPreprocessor.for_model(vlm.encoder)

    def edit(self, suppress: Sequence[str], boost: Sequence[str], k: int, strength: float) -> FeatureEdit:
        def indices(words):
            found = [concept_features(self.vlm, w, k) for w in words]
            return torch.cat(found)[None] if found else None
        return FeatureEdit(indices(suppress), indices(boost), strength)

    def __call__(self, image: Image.Image | bytes | str | Path, question: str = QUESTIONS["subject"],
                 suppress: Sequence[str] = (), boost: Sequence[str] = (), k: int = 1, strength: float = 2.0,
                 max_new_tokens: int = 8) -> str:
        if isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        if isinstance(image, Image.Image):
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG")
            image = buffer.getvalue()
        try:
            pixels = torch.from_numpy(self.preprocess.image(image))[None]
        except UnidentifiedImageError:
            raise ValueError("the image given is not a readable image file") from None
        return self.vlm.answer(pixels, [question], self.edit(suppress, boost, k, strength), max_new_tokens)[0]


def steer(image, suppress: Sequence[str] = (), boost: Sequence[str] = (), k: int = 1, strength: float = 2.0,
          question: str = QUESTIONS["subject"], vlm_dir: str | Path = "vlm/sparse_plus") -> str:
    """One-call API: load the VLM in ``vlm_dir`` and answer with the edit applied."""
    from pipeline.vlm.train import load_vlm

    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise FileNotFoundError(f"no image file {image}")
    return Steerer(load_vlm(vlm_dir))(image, question, suppress, boost, k, strength)


def steering_evaluation(vlm: VisionLanguageModel, images: torch.Tensor, labels: Sequence[str], classes: Sequence[str],
                        question: str, ks: Sequence[int], strengths: Sequence[float], *, seed: int = 0,
                        batch_size: int = 32, max_new_tokens: int = 24, max_words: int | None = None,
                        quantile: float = 0.99) -> dict[str, Any]:
    """Fig 8b: per image suppress its true label and boost a random other label, for every
    (K, SS); SBERT similarity of the answer to the true and to the boosted label, how often the
    answer is the boosted label, the corruption rate (paper: "abnormally long responses"; here an
    answer that is empty or has more words than ``max_words``, or when that is None than the
    ``quantile`` of the unedited answers' own word counts), the same for random feature edits of
    the same size (the control), and a paired sign test of named against random edits
    (``p_named_beats_random``). Every answer may run to ``max_new_tokens``, so that a long one can
    show: answers cut at the normal answer length could never be abnormally long."""
    rng = random.Random(seed)
    boosted = [rng.choice([c for c in classes if c != label]) for label in labels]
    rows = [{"image": i, "question": question} for i in range(len(labels))]
    features = encode_images(vlm, images, batch_size)  # once: every cell of the grid edits the same features
    baseline = answer_all(vlm, images, rows, batch_size, max_new_tokens, desc="steering: unedited", features=features)
    max_words = corruption_threshold(baseline, quantile) if max_words is None else max_words
    results: dict[str, Any] = {"corruption_words": max_words, "baseline": _scores(baseline, labels, boosted, max_words),
                               "grid": {}}
    width = vlm.encoder.width
    generator = np.random.default_rng(seed)
    for k in ks:
        lookup = {c: concept_features(vlm, c, k) for c in classes}
        for strength in strengths:
            named = _edits(rows, batch_size, [lookup[x] for x in labels], [lookup[x] for x in boosted], strength)
            random_edits = _edits(rows, batch_size, [torch.as_tensor(generator.choice(width, k, replace=False))
                                                     for _ in labels],
                                  [torch.as_tensor(generator.choice(width, k, replace=False)) for _ in labels], strength)
            steered = answer_all(vlm, images, rows, batch_size, max_new_tokens, named, desc=f"steering K={k} SS={strength}",
                                 features=features)
            control = answer_all(vlm, images, rows, batch_size, max_new_tokens, random_edits, desc="random edits",
                                 features=features)
            results["grid"][f"k{k}_ss{strength:g}"] = {
                "k": k, "strength": strength, **_scores(steered, labels, boosted, max_words),
                **{f"random.{m}": v for m, v in _scores(control, labels, boosted, max_words).items()},
                **_named_vs_random(steered, control, boosted),
                "examples": [{"true": t, "boosted": b, "before": a0, "after": a1}
                             for t, b, a0, a1 in list(zip(labels, boosted, baseline, steered))[:8]],
            }
    return results


def corruption_threshold(unedited: Sequence[str], quantile: float) -> int:
    """The most words a normal answer has: the ``quantile`` of the unedited answers' word counts
    (at least 1); a steered answer with more is abnormally long."""
    counts = [len(a.split()) for a in unedited]
    return max(1, math.ceil(float(np.quantile(counts, quantile)))) if counts else 1


def corrupted(answer: str, max_words: int) -> bool:
    return not answer.strip() or len(answer.split()) > max_words


def _edits(rows, batch_size: int, suppress: Sequence[torch.Tensor], boost: Sequence[torch.Tensor],
           strength: float) -> list[FeatureEdit]:
    return [FeatureEdit(torch.stack(list(suppress[s : s + batch_size])), torch.stack(list(boost[s : s + batch_size])),
                        strength) for s in range(0, len(rows), batch_size)]


def _named_vs_random(named: Sequence[str], control: Sequence[str], boosted: Sequence[str]) -> dict[str, float]:
    """Paired per image: does the named edit give the boosted label where the random edit does not,
    and vice versa; a one-sided sign test on those discordant images says whether named edits
    move answers to the boosted label more often than random edits of the same size."""
    hit_named = [normalise(a) == b for a, b in zip(named, boosted)]
    hit_random = [normalise(a) == b for a, b in zip(control, boosted)]
    named_only = sum(n and not r for n, r in zip(hit_named, hit_random))
    random_only = sum(r and not n for n, r in zip(hit_named, hit_random))
    return {"named_only": named_only, "random_only": random_only,
            "p_named_beats_random": p_above(named_only, named_only + random_only, 0.5)}


def _scores(answers: Sequence[str], labels: Sequence[str], boosted: Sequence[str], max_words: int) -> dict[str, float]:
    """The cell's means, each with its 95% interval (``<name>_lo95`` / ``<name>_hi95``): Wilson's for
    the rates, the normal one for the mean similarities."""
    per_image = {
        "sim_true": np.asarray(sbert_similarity(answers, labels), dtype=float),
        "sim_boosted": np.asarray(sbert_similarity(answers, boosted), dtype=float),
        "true_rate": np.array([normalise(a) == x for a, x in zip(answers, labels)]),
        "boosted_rate": np.array([normalise(a) == x for a, x in zip(answers, boosted)]),
        "corruption": np.array([corrupted(a, max_words) for a in answers]),
    }
    out: dict[str, float] = {}
    for name, values in per_image.items():
        low, high = wilson_interval(values) if values.dtype == bool else mean_interval(values)
        out.update({name: float(values.mean()), f"{name}_lo95": low, f"{name}_hi95": high})
    return out


def wilson_interval(hits: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a rate: sensible at 0 and 1 hits, where the normal one collapses."""
    from scipy.stats import binomtest

    if len(hits) == 0:
        return math.nan, math.nan
    ci = binomtest(int(hits.sum()), len(hits)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The t interval of a mean over images."""
    from scipy.stats import t

    if len(values) < 2:
        return math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return float(values.mean()) - half, float(values.mean()) + half


def run_steering(params: Params, vlm_dir: Path, plot_dir: Path) -> tuple[dict[str, Any], str]:
    """The steer stage: :func:`steering_evaluation` for each of ``steer.question_types`` on the
    test images; draws the Fig 8b figure and writes a qualitative table and the examples into
    ``plot_dir``. Returns the results (numbers under ``<question>.baseline.*`` and
    ``<question>.grid.k<K>_ss<SS>.*``, beside each cell's examples) and a one-line summary."""
    from pipeline.io import write_json
    from pipeline.vlm.train import held_out_examples, load_vlm

    cfg = params.steer
    model = load_vlm(vlm_dir)
    images, examples, _ = held_out_examples(params, model, limit=cfg.images)
    results = {}
    for question_type in cfg.question_types:
        answer_of = {e["image"]: e["answer"] for e in examples if e["type"] == question_type}
        if not answer_of:
            raise ValueError(f"steer.question_types: no test image has an answer to the {question_type!r} question "
                             f"(vlm.question_types {params.vlm.question_types}; captioned photos answer 'subject' only)")
        rows = sorted(answer_of)
        labels = [answer_of[i] for i in rows]
        results[question_type] = steering_evaluation(
            model, images[rows], labels, sorted(set(labels)), QUESTIONS[question_type], cfg.ks, cfg.strengths,
            seed=params.project.seed, batch_size=params.vlm.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
            max_words=cfg.max_words, quantile=cfg.corruption_quantile)
    write_json(plot_dir / "examples.json", {q: {k: g["examples"] for k, g in r["grid"].items()}
                                            for q, r in results.items()})
    (plot_dir / "examples.md").write_text(qualitative_table(results))
    fig8b(results, plot_dir / "fig8b.png")
    summary = "; ".join(
        f"{q}: K={g['k']} SS={g['strength']:g} similarity to boosted {g['sim_boosted']:.3f} (random "
        f"{g['random.sim_boosted']:.3f}), corrupted {g['corruption']:.0%}"
        for q, r in results.items() for g in [max(r["grid"].values(), key=lambda g: g["sim_boosted"])])
    return results, summary


def fig8b(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """The paper's Fig 8b, one column per question: SBERT similarity of the answers to the true
    and to the boosted label against K (one colour per SS; random edits of the same size dashed),
    and the corrupted share against K below."""
    import matplotlib.pyplot as plt

    from pipeline.plots import save_figure

    fig, axes = plt.subplots(3, len(results), figsize=(4.2 * len(results), 8.4), squeeze=False, sharex=True)
    rows = [("sim_true", "similarity to the true label"), ("sim_boosted", "similarity to the boosted label"),
            ("corruption", "corrupted answers")]
    for col, (question, result) in enumerate(results.items()):
        points = list(result["grid"].values())
        strengths = sorted({g["strength"] for g in points})
        for row, (metric, label) in enumerate(rows):
            ax = axes[row, col]
            for i, strength in enumerate(strengths):
                line = sorted((g["k"], g[metric], g[f"random.{metric}"], g.get(f"{metric}_lo95", np.nan),
                               g.get(f"{metric}_hi95", np.nan)) for g in points if g["strength"] == strength)
                ks, named, control, low, high = zip(*line)
                colour = f"C{i}"
                ax.plot(ks, named, marker="o", color=colour, label=f"SS {strength:g}")
                ax.fill_between(ks, low, high, color=colour, alpha=0.15, lw=0)
                ax.plot(ks, control, ls="--", color=colour, alpha=0.7)
            ax.axhline(result["baseline"][metric], color="grey", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{question} (band: 95% interval; dashed: random edits; dotted: unedited)", fontsize=8)
        axes[-1, col].set_xlabel("K (features per concept)")
        axes[0, col].legend(fontsize=7)
    return save_figure(fig, path, "Steering (Fig 8b)")


def qualitative_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| question | K | SS | true | boosted | before | after |", "|---|---|---|---|---|---|---|"]
    for question, result in results.items():
        for g in result["grid"].values():
            for e in g["examples"][:4]:
                lines.append(f"| {question} | {g['k']} | {g['strength']:g} | {e['true']} | {e['boosted']} | "
                             f"{e['before']} | {e['after']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.vlm.steering", description=__doc__)
    parser.add_argument("image", help="an image file")
    parser.add_argument("--vlm", default="vlm/sparse_plus", help="a trained VLM folder (the vlm stage's output)")
    parser.add_argument("--question", default=QUESTIONS["subject"])
    parser.add_argument("--suppress", nargs="*", default=[], help="concept words to suppress")
    parser.add_argument("--boost", nargs="*", default=[], help="concept words to boost")
    parser.add_argument("-k", type=int, default=1, help="features per concept word")
    parser.add_argument("--strength", type=float, default=2.0, help="value boosted features are set to (SS)")
    run_stage(lambda args: print(steer(args.image, args.suppress, args.boost, args.k, args.strength, args.question,
                                       args.vlm)), parser, argv)


if __name__ == "__main__":
    main()
