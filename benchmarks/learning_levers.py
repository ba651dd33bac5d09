"""What holds the embedded CLIP back from learning shape: the levers beyond the tower, side by side.

With the ModifiedResNet tower (``benchmarks/tower_levers.py``), the same tower trained with shape
labels reaches ~80% val shape accuracy in 250 steps, while CLIP on the generated captions stays
near 25% in the run's 336 steps. Each setting here changes one thing -- what the captions say, how
batches are drawn, the optimiser, the temperature, the embedding width, the number of steps --
and trains with the pipeline's own recipe (:func:`pipeline.clip.train.train_in_process`) on the
sampled data, scoring every concept family's zero-shot top-1 and image->text R@1 on the val split
against training seconds. Captions are rewritten from each record's ground truth, so the caption
settings are diagnostics (what the contrastive signal can teach), not proposals for the data.

    python -m benchmarks.learning_levers                               # after the sample stage
    python -m benchmarks.learning_levers --only baseline --steps 3024 --tag long   # a long curve

Prints one row per setting and writes ``benchmarks/results/learning_levers[_<tag>].{json,png}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks.sparsity_tradeoff import parse_overrides, selected, settings_parser
from benchmarks.tower_levers import chance_levels, measure, print_row, write_results


def main_only_caption(truth: dict) -> str:
    """The main object's colour and shape alone: "a red circle"."""
    main = truth["objects"][truth["main"]]
    return f"a {main['colour']} {main['shape']}"


def canonical_caption(truth: dict) -> str:
    """Everything the scene holds, in one fixed template and canonical words."""
    main, *others = truth["objects"]
    text = f"a {main['size']} {main['colour']} {main['shape']} {main['position']}"
    if others:
        text += " with " + " and ".join(f"a {o['size']} {o['colour']} {o['shape']}" for o in others)
    text += f" on a {truth['background']} background"
    if truth.get("word"):
        text += f" and the word {truth['word']['text']}"
    return text


def redrawn_caption(truth: dict, position_probability: float = 0.5) -> str:
    """The generator's own caption for the scene, redrawn from a fresh seed, naming the main
    object's place with ``position_probability`` (the data's is 0.5): the control for
    :func:`position_named_caption`, whose wording differs from the sampled captions' the same way."""
    from pipeline.data.generator import scene_caption

    rng = np.random.default_rng([truth["seed"], truth["index"], 1])
    return scene_caption(rng, truth["objects"], truth["background"], truth["word"], position_probability)


def position_named_caption(truth: dict) -> str:
    """The redrawn caption with the main object's place always named: what naming position in
    every caption teaches (``sample.source.generator.position_probability: 1``)."""
    return redrawn_caption(truth, position_probability=1.0)


def hard_negative_batches(group_keys: list[tuple], share: float) -> Callable[..., Iterator[dict]]:
    """A batch order in which a ``share`` of the batches are drawn from one group of records that
    share ``group_keys`` (e.g. the main object's colour), so the batch cannot be told apart by that
    concept; the rest are drawn uniformly. Groups smaller than a batch are never drawn alone."""
    members: dict[tuple, list[int]] = {}
    for row, key in enumerate(group_keys):
        members.setdefault(key, []).append(row)

    def batches(data: dict, batch_size: int, seed: int) -> Iterator[dict]:
        import torch

        groups = [np.array(rows) for rows in members.values() if len(rows) >= batch_size]
        if not groups:
            raise ValueError(f"no group of records holds a batch of {batch_size}")
        rng = np.random.default_rng(seed)
        total = len(data["text"])
        for _ in range(total // batch_size):
            if rng.random() < share:
                rows = rng.choice(groups[rng.integers(len(groups))], batch_size, replace=False)
            else:
                rows = rng.choice(total, batch_size, replace=False)
            index = torch.as_tensor(rows, device=data["text"].device)
            yield {key: value[index] for key, value in data.items()}

    return batches


def _main_colour(truth: dict) -> tuple:
    return (truth["objects"][truth["main"]]["colour"],)


def _main_colour_and_background(truth: dict) -> tuple:
    return (truth["objects"][truth["main"]]["colour"], truth["background"])


# name -> params overrides, plus optional "captions" (truth -> caption) and "hard" ((keys, share))
SETTINGS: dict[str, dict[str, Any]] = {
    "baseline (params.yaml)": {},
    "captions: the main object only (a red circle)": {"captions": main_only_caption},
    "captions: every object, one template, canonical words": {"captions": canonical_caption},
    "captions: the generator's, redrawn (the control for the next)": {"captions": redrawn_caption},
    "captions: the generator's, the main object's position always named": {"captions": position_named_caption},
    "batches: half from one main colour": {"hard": (_main_colour, 0.5)},
    "batches: half from one main colour and background": {"hard": (_main_colour_and_background, 0.5)},
    "optimiser: lr 1e-3, weight decay 0.05": {"train.optim.lr": 1e-3, "train.optim.weight_decay": 0.05},
    "temperature: logit scale starts at 100": {"train.model.init_logit_scale": 4.6052},
    "embedding: embed_dim 128": {"train.model.inline.embed_dim": 128},
}


def run_setting(name: str, setting: dict, args, arrays: dict, truths: list[dict], val: dict,
                base_overrides: dict) -> dict:
    """One setting's curves, with its captions rewritten and its batches drawn as it asks."""
    setting = dict(setting)
    captions, hard = setting.pop("captions", None), setting.pop("hard", None)
    if captions is not None:
        arrays = {**arrays, "text": val["preprocessor"].tokens([captions(t) for t in truths])}
    batches = hard_negative_batches([hard[0](t) for t in truths], hard[1]) if hard else None
    variant = setting.pop("variant", args.variant)
    row = measure(name, {"variant": variant, **setting}, args.params, arrays, val, args.steps,
                  args.eval_every, base_overrides, batches=batches)
    row["overrides"].update({"captions": captions.__name__} if captions else {})
    row["overrides"].update({"hard_negatives": {"keys": hard[0].__name__, "share": hard[1]}} if hard else {})
    return row


def main() -> None:
    import torch

    from pipeline.clip.model import build_model
    from pipeline.clip.recipe import load_val
    from pipeline.config import load_params
    from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays

    parser = settings_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per setting (default: the run's)")
    parser.add_argument("--eval-every", type=int, default=112, help="steps between val evaluations")
    parser.add_argument("--variant", default="dense", help="the train.variants entry each setting trains")
    parser.add_argument("--tag", default=None, help="results file suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = parse_overrides(args.set)
    base = load_params(args.params, overrides=overrides)
    probe = build_model(base.train.model)
    preprocessor = ClipBatchPreprocessor.for_model(probe)
    arrays, metas = load_split_arrays(base.sample.out_dir, "train", preprocessor)
    truths = [meta["truth"] for meta in metas]
    val = load_val(base.sample.out_dir, preprocessor, limit=1000)
    chance = chance_levels(val)
    rows = []
    for name, setting in selected(SETTINGS, args.only).items():
        row = run_setting(name, setting, args, arrays, truths, val, overrides)
        rows.append(row)
        print_row(row, width=56)
    write_results("learning_levers", rows, chance, val, args.threads, args.tag)


if __name__ == "__main__":
    main()
