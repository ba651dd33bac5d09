"""Concept steering (paper §4, Fig 8): the top-K features the *text* encoder activates for a
concept word are zeroed (suppress) or set to the steering strength SS (boost) in the sparse
features before the adapter. ``steer(image, suppress=["red"], boost=["blue"])`` is the API;
``python -m pipeline.vlm.steering`` the CLI; :func:`steering_evaluation` the Fig 8b protocol.
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.vlm.evaluate import answer_all, p_above, sbert_similarity
from pipeline.vlm.model import FeatureEdit, VisionLanguageModel
from pipeline.vlm.questions import QUESTIONS, normalise


@torch.no_grad()
def concept_features(vlm: VisionLanguageModel, word: str, k: int) -> torch.Tensor:
    """Indices of the k features the text encoder activates most for ``word``."""
    pre = ClipBatchPreprocessor(vlm.encoder.image_size, vlm.encoder.context_length)
    features = vlm.encoder.encode_text(torch.as_tensor(pre.tokens([word])))[0]
    return torch.topk(features, k).indices


class Steerer:
    """A trained VLM plus the concept -> features lookup: answer a question about an image
    with named concepts suppressed and/or boosted."""

    def __init__(self, vlm: VisionLanguageModel):
        self.vlm = vlm
        self.preprocess = ClipBatchPreprocessor(vlm.encoder.image_size, vlm.encoder.context_length)

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
        pixels = torch.from_numpy(self.preprocess.image(image))[None]
        return self.vlm.answer(pixels, [question], self.edit(suppress, boost, k, strength), max_new_tokens)[0]


def steer(image, suppress: Sequence[str] = (), boost: Sequence[str] = (), k: int = 1, strength: float = 2.0,
          question: str = QUESTIONS["subject"], vlm_dir: str | Path = "vlm/sparse") -> str:
    """One-call API: load the VLM in ``vlm_dir`` and answer with the edit applied."""
    from pipeline.vlm.train import load_vlm

    return Steerer(load_vlm(vlm_dir))(image, question, suppress, boost, k, strength)


def steering_evaluation(vlm: VisionLanguageModel, images: torch.Tensor, labels: Sequence[str], classes: Sequence[str],
                        question: str, ks: Sequence[int], strengths: Sequence[float], *, seed: int = 0,
                        batch_size: int = 32, max_new_tokens: int = 8, max_words: int = 6) -> dict[str, Any]:
    """Fig 8b: per image suppress its true label and boost a random other label, for every
    (K, SS); SBERT similarity of the answer to the true and to the boosted label, how often the
    answer is the boosted label, the corruption rate (empty or more than ``max_words`` words),
    the same for random feature edits of the same size (the control), and a paired sign test of
    named against random edits (``p_named_beats_random``)."""
    rng = random.Random(seed)
    boosted = [rng.choice([c for c in classes if c != label]) for label in labels]
    rows = [{"image": i, "question": question} for i in range(len(labels))]
    baseline = answer_all(vlm, images, rows, batch_size, max_new_tokens, desc="steering: unedited")
    results: dict[str, Any] = {"baseline": _scores(baseline, labels, boosted, max_words), "grid": {}}
    width = vlm.encoder.width
    generator = np.random.default_rng(seed)
    for k in ks:
        lookup = {c: concept_features(vlm, c, k) for c in classes}
        for strength in strengths:
            named = _edits(rows, batch_size, [lookup[x] for x in labels], [lookup[x] for x in boosted], strength)
            random_edits = _edits(rows, batch_size, [torch.as_tensor(generator.choice(width, k, replace=False))
                                                     for _ in labels],
                                  [torch.as_tensor(generator.choice(width, k, replace=False)) for _ in labels], strength)
            steered = answer_all(vlm, images, rows, batch_size, max_new_tokens, named, desc=f"steering K={k} SS={strength}")
            control = answer_all(vlm, images, rows, batch_size, max_new_tokens, random_edits, desc="random edits")
            results["grid"][f"k{k}_ss{strength:g}"] = {
                "k": k, "strength": strength, **_scores(steered, labels, boosted, max_words),
                **{f"random.{m}": v for m, v in _scores(control, labels, boosted, max_words).items()},
                **_named_vs_random(steered, control, boosted),
                "examples": [{"true": t, "boosted": b, "before": a0, "after": a1}
                             for t, b, a0, a1 in list(zip(labels, boosted, baseline, steered))[:8]],
            }
    return results


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
    return {
        "sim_true": float(np.mean(sbert_similarity(answers, labels))),
        "sim_boosted": float(np.mean(sbert_similarity(answers, boosted))),
        "true_rate": float(np.mean([normalise(a) == x for a, x in zip(answers, labels)])),
        "boosted_rate": float(np.mean([normalise(a) == x for a, x in zip(answers, boosted)])),
        "corruption": float(np.mean([not a.strip() or len(a.split()) > max_words for a in answers])),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.vlm.steering", description=__doc__)
    parser.add_argument("image", help="an image file")
    parser.add_argument("--vlm", default="vlm/sparse", help="a trained VLM folder (the vlm stage's output)")
    parser.add_argument("--question", default=QUESTIONS["subject"])
    parser.add_argument("--suppress", nargs="*", default=[], help="concept words to suppress")
    parser.add_argument("--boost", nargs="*", default=[], help="concept words to boost")
    parser.add_argument("-k", type=int, default=1, help="features per concept word")
    parser.add_argument("--strength", type=float, default=2.0, help="value boosted features are set to (SS)")
    args = parser.parse_args(argv)
    print(steer(args.image, args.suppress, args.boost, args.k, args.strength, args.question, args.vlm))


if __name__ == "__main__":
    main()
