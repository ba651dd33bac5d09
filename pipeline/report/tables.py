"""The paper's tables from :class:`~pipeline.report.sources.Model` rows, as plain cells.

Each table is a list of columns (a header, the stage that measured the value, its metric key, and
how to show it); a model appears in a table when it has any of its values, and a table with no
rows is left out, so a pipeline without the VLM stages simply has no VLM table. Columns that
depend on the data (zero-shot tasks, QA question types, steering grid points) are found from the
metric keys themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.report.sources import Comparison, Model

MISSING = "–"


@dataclass(frozen=True)
class Column:
    header: str
    stage: str
    key: str
    kind: str = "pct"  # pct: a fraction shown as %; pct100: already a %; num; num1; int; p: a p-value


@dataclass
class Table:
    name: str
    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


def fmt(value: float | None, kind: str) -> str:
    if value is None or math.isnan(value):
        return MISSING
    return {"pct": f"{100 * value:.1f}", "pct100": f"{value:.1f}", "num": f"{value:.3f}", "num1": f"{value:.1f}",
            "int": f"{value:.0f}", "p": f"{value:.0e}" if value < 0.001 else f"{value:.3f}"}[kind]


def metric_table(name: str, title: str, note: str, columns: list[Column], models: Iterable[Model]) -> Table:
    rows = []
    for model in models:
        values = [model.value(c.stage, c.key) for c in columns]
        if any(v is not None for v in values):
            rows.append([model.label, *(fmt(v, c.kind) for v, c in zip(values, columns))])
    return Table(name, title, note, ["model", *(c.header for c in columns)], rows)


def _keys(models: Iterable[Model], stage: str, pattern: str) -> list[str]:
    """The first group of ``pattern`` over a stage's metric keys, in order of appearance."""
    found: dict[str, None] = {}
    for model in models:
        for key in model.stages.get(stage, {}):
            if match := re.fullmatch(pattern, key):
                found.setdefault(match.group(1))
    return list(found)


# --------------------------------------------------------------------------- the tables


def zero_shot(models: list[Model]) -> Table:
    tasks = [t for t in _keys(models, "metrics", r"zeroshot\.(\w+)\.top1") if t != "box_classification"]
    columns = [Column(f"{t} {what}", "metrics", f"zeroshot.{t}.{key}") for t in tasks
               for what, key in (("top-1", "top1"), ("chance", "chance"))]
    return metric_table("zeroshot", "Tab 1 · Zero-shot classification", "Top-1 accuracy (%) on the test split's "
                        "labelled sets, one prompt-ensembled classifier per task (one task per concept family of "
                        "the generated data), beside chance: the share of the most common class, what a constant "
                        "answer scores (top-5 is in metrics/<model>.json).", columns, models)


def probes(models: list[Model]) -> Table:
    tasks = _keys(models, "metrics", r"probe\.(\w+)\.accuracy")
    columns = [Column(f"{t} {what}", "metrics", f"probe.{t}.{key}") for t in tasks
               for what, key in (("probe", "accuracy"), ("chance", "chance"))]
    columns += [Column("segmentation AUROC", "metrics", "segmentation_probe.auroc", "num"),
                Column("foreground tokens %", "metrics", "segmentation_probe.foreground_share")]
    return metric_table("probes", "Beyond zero-shot · linear probes", "A logistic regression on each model's frozen, "
                        "unit-norm image features per concept family (fitted on val, accuracy % on test, beside the "
                        "majority class's share); and per spatial token of the token sample, foreground (inside an "
                        "object's box) against background, fitted on half the images, AUROC on the other half. A "
                        "family the probe reads and zero-shot (Tab 1) misses is in the image features and lost "
                        "between the towers.", columns, models)


def box_and_retrieval(models: list[Model]) -> Table:
    columns = [Column("box top-1", "metrics", "zeroshot.box_classification.top1"),
               Column("box chance", "metrics", "zeroshot.box_classification.chance"),
               *(Column(f"{d} R@{k}", "metrics", f"retrieval.{d}_retrieval_r{k}") for d in ("image", "text")
                 for k in (1, 5))]
    return metric_table("box_retrieval", "Tab 2 · Box classification and retrieval", "Object-crop classification "
                        "accuracy and retrieval recall (%), test split.", columns, models)


def captions(models: list[Model]) -> Table:
    columns = [*(Column(f"{d} R@10", "metrics", f"retrieval.{d}_retrieval_r10") for d in ("image", "text")),
               Column("tagging AUROC", "metrics", "tagging.auroc", "num"), Column("tags", "metrics", "tagging.tags", "int"),
               Column("name in top images' captions %", "atlas", "caption_naming.agreement"),
               Column("chance %", "atlas", "caption_naming.chance"),
               Column("named features", "atlas", "caption_naming.features", "int")]
    return metric_table("captions", "Judged by captions · retrieval, tagging and naming", "What photos without labels "
                        "allow (test split): retrieval R@10 (R@1/5 in Tab 2); open-vocabulary tagging, the AUROC of each "
                        "image's zero-shot score for a frequent caption noun against the noun being in the photo's "
                        "captions, averaged over the tags (0.5 is chance); naming: the share of a named feature's top "
                        "images whose captions use its name (its top vocabulary word, from the text side), beside the "
                        "share those names would reach on random images.", columns, models)


def sparsity(models: list[Model]) -> Table:
    columns = [Column("width", "metrics", "width", "int"), Column("L0 image", "metrics", "image.l0", "num1"),
               Column("L0 image %", "metrics", "image.l0_pct", "pct100"), Column("L0 text", "metrics", "text.l0", "num1"),
               Column("active %", "metrics", "image.active_fraction"), Column("dead %", "metrics", "image.dead_fraction"),
               Column("Clarity", "metrics", "clarity", "num"), Column("Clarity baseline", "metrics", "clarity_baseline", "num"),
               Column("multimodal %", "metrics", "modality.multimodal")]
    return metric_table("sparsity", "Tab 3a · Interpretability and sparsity", "L0: mean active features per image "
                        "(text); active/dead: share of features that ever/never fire on images; Clarity (Eq. 2) "
                        "against the dataset baseline, on the reference stage's encoder (`reference.encoder`; the "
                        "embedded default is ImageNet EfficientNet-lite0, where the paper uses OpenAI CLIP): compare "
                        "Clarity across the rows of one report, not with the paper's values; multimodal: modality "
                        "score in [0.1, 0.9] on unit-norm activations (the image SAE saw images only: single-modal by "
                        "construction, not scored; sae_multimodal is trained on images and captions; sae_cls, the paper's "
                        "Prisma-style baseline, reads the CLS token of a late vision block and has no text side).",
                        columns, models)


def recovery(models: list[Model]) -> Table:
    columns = [Column(f"{label} {what}", "metrics", f"{scope}.{key}")
               for scope, label in (("recovery", "all objects ·"), ("recovery_main", "main object ·"))
               for what, key in (("monosemantic %", "monosemantic_fraction"), ("covered %", "coverage"),
                                 ("precise %", "precise_fraction"), ("covered by precise %", "split_coverage"))]
    return metric_table("recovery", "Beyond the paper · ground-truth concept recovery", "The generated images' "
                        "concepts (every family, count included) against each image feature (test split). An image "
                        "holds a concept when any of its objects does (all objects), or when its main object does "
                        "(main object: the one every caption names and the zero-shot tasks score; background, word and "
                        "count belong to the image). Monosemantic: active features that detect one concept at AUROC "
                        ">= metrics.mono_auroc and no other; covered: concepts that some single feature detects at that "
                        "bar; precise: features (firing on >= metrics.precise_min_images images) whose firing images "
                        "hold a concept at precision >= metrics.mono_precision; covered by precise: concepts on "
                        "whose images at least that share any of their precise features fires (a concept split over "
                        "several partial, precise features is covered here and not by one feature). A feature fires "
                        "where it is positive (for a dense model, a positive coordinate).", columns, models)


def sae(models: list[Model]) -> Table:
    columns = [Column("FVU", "sae", "reconstruction.all.fvu", "num"), Column("cosine", "sae", "reconstruction.all.cosine", "num"),
               Column("L0", "sae", "reconstruction.all.l0", "num1"), Column("dead %", "sae", "reconstruction.all.dead_fraction"),
               Column("rows", "sae", "reconstruction.all.n", "int"),
               Column("outlier FVU", "sae", "reconstruction.outlier.fvu", "num"),
               Column("outlier cosine", "sae", "reconstruction.outlier.cosine", "num"),
               Column("outlier L0", "sae", "reconstruction.outlier.l0", "num1"),
               Column("outlier rows", "sae", "reconstruction.outlier.n", "int")]
    for task in _keys(models, "sae", r"zeroshot_reconstruction\.(\w+)\.dense\.top1"):
        columns += [Column(f"{task} top-1 dense", "sae", f"zeroshot_reconstruction.{task}.dense.top1"),
                    Column(f"{task} top-1 via SAE", "sae", f"zeroshot_reconstruction.{task}.sae_reconstruction.top1")]
    return metric_table("sae", "Post-hoc SAE baselines", "Reconstruction (all rows and high-norm outliers, the SAE "
                        "supplementary's Table 6) by each SAE of the dense model: sae of its image embeddings, "
                        "sae_multimodal of its image and caption embeddings, sae_cls of the CLS token after vision "
                        "block `sae.cls_layer` (the paper's baseline: Prisma cls@11 of 12), sae_residual of every "
                        "residual token of the vision tower at `sae.residual_layer`; zero-shot accuracy (%) when the image "
                        "embeddings are replaced by their SAE reconstruction.", columns, models)


def training(models: list[Model]) -> Table:
    columns = [Column("loss", "train", "train.loss", "num"), Column("L0 image %", "train", "train.l0_image_pct", "pct100"),
               Column("L0 text %", "train", "train.l0_text_pct", "pct100"),
               Column("dead %", "train", "train.dead_fraction"), Column("logit scale", "train", "train.logit_scale", "num1")]
    columns += [Column(f"val {t} top-1", "train", f"zeroshot.{t}.top1")
                for t in _keys(models, "train", r"zeroshot\.(\w+)\.top1")]
    columns.append(Column("samples/s", "train", "train.samples_per_s", "int"))
    return metric_table("training", "Training · final values", "Last logged value of each training metric; "
                        "zero-shot on the val split during training.", columns, models)


def atlas(models: list[Model]) -> Table:
    columns = [Column("pointing %", "atlas", "pointing.accuracy"), Column("chance %", "atlas", "pointing.chance"),
               Column("shape %", "atlas", "pointing.shape.accuracy"), Column("colour %", "atlas", "pointing.colour.accuracy"),
               Column("distinct names", "atlas", "distinct_names", "int"),
               Column("concepts named %", "atlas", "naming.in_top_words")]
    return metric_table("atlas", "Feature atlas · pointing game and naming", "Pointing game: the named feature's "
                        "heatmap peak falls in the object's box (%), against the box-area chance.", columns, models)


def vlm(models: list[Model]) -> Table:
    kinds = _keys(models, "vlm", r"qa\.(\w+)\.exact")
    columns = [c for q in kinds for c in (Column(f"{q} exact %", "vlm", f"qa.{q}.exact"),
                                          Column(f"{q} chance %", "vlm", f"qa.{q}.chance"),
                                          Column(f"{q} SBERT", "vlm", f"qa.{q}.sbert", "num"))]
    return metric_table("vlm", "VLM · question answering", "Exact-match accuracy (%) and SBERT similarity of the "
                        "answers on held-out images, per question type; chance: the exact match of the same answers "
                        "given to the images in random order.", columns, models)


STEER_COLUMNS = [("sim to true", "sim_true", "num"), ("sim to boosted", "sim_boosted", "num"),
                 ("boosted %", "boosted_rate", "pct"), ("corrupted %", "corruption", "pct"),
                 ("random: sim to boosted", "random.sim_boosted", "num"), ("random: boosted %", "random.boosted_rate", "pct"),
                 ("p (named > random)", "p_named_beats_random", "p")]


def _with_interval(metrics: dict[str, float], key: str, kind: str) -> str:
    """A value with its 95% interval in brackets, where the stage measured one."""
    low, high = metrics.get(f"{key}_lo95"), metrics.get(f"{key}_hi95")
    shown = fmt(metrics.get(key), kind)
    return shown if low is None or high is None else f"{shown} [{fmt(low, kind)}, {fmt(high, kind)}]"


def steering(models: list[Model]) -> Table:
    rows = []
    for model in models:
        metrics = model.stages.get("steer", {})
        # keys are <question>.baseline.* / <question>.grid.<point>.*; runs before per-question
        # steering have no <question>. prefix
        questions = sorted({k.split(".grid.")[0] for k in metrics if ".grid." in k}
                           | ({""} if any(k.startswith("grid.") for k in metrics) else set()))
        for question in questions:
            prefix = f"{question}." if question else ""
            points = sorted({k[len(prefix):].split(".")[1] for k in metrics if k.startswith(f"{prefix}grid.")},
                            key=lambda p: (metrics.get(f"{prefix}grid.{p}.k", 0), metrics.get(f"{prefix}grid.{p}.strength", 0)))
            if any(k.startswith(f"{prefix}baseline.") for k in metrics):
                rows.append([model.label, question or MISSING, "none", MISSING,
                             *(fmt(metrics.get(f"{prefix}baseline.{key}"), kind) for _, key, kind in STEER_COLUMNS)])
            for point in points:
                at = f"{prefix}grid.{point}"
                rows.append([model.label, question or MISSING, fmt(metrics.get(f"{at}.k"), "int"),
                             f"{metrics.get(f'{at}.strength', float('nan')):g}",
                             *(_with_interval(metrics, f"{at}.{key}", kind) for _, key, kind in STEER_COLUMNS)])
    return Table("steering", "Steering (Fig 8b)", "Answers after suppressing the true label's top-K text features "
                 "and boosting another label's at strength SS (95% intervals in brackets), against random edits of the "
                 "same size; corrupted: "
                 "empty or longer than the unedited answers' 99th percentile; p: paired sign test that named edits "
                 "give the boosted label on more images than random ones.",
                 ["model", "question", "K", "SS", *(h for h, _, _ in STEER_COLUMNS)], rows)


# The paper's recipe for the knobs this project adds (docs/findings.md, "Sparsity in the embedded run"): a knob that differs is
# shown in the models table, so no reader takes an embedded run for the paper's.
PAPER_KNOBS = {"model.head_bias_init": "None", "optim.head_lr_multiplier": "1.0", "model.logit_scale_mode": "learnable",
               "model.init_logit_scale": "2.6592"}


def models_table(models: list[Model]) -> Table:
    keys = [("towers", "model.arch"), ("expansion", "model.expansion"), ("activation", "model.activation"),
            ("pooling", "model.pooling"), ("logit scale cap", "model.logit_scale_cap")]
    rows = []
    for model in models:
        if model.params:
            shown = {**model.params, "model.arch": towers(model)}
            width = model.value("metrics", "width") or model.value("train", "width")
            rows.append([model.label, *(shown.get(k, MISSING) for _, k in keys), fmt(width, "int"),
                         scale_at_cap(model), knobs_off_recipe(model), clarity_reference(model)])
    return Table("models", "Models compared", "From each model's training run. Towers: the open_clip config, or the "
                 "pretrained towers that replace its own (locked: frozen, only the projections and heads train). "
                 "Scale at cap: when the learned "
                 "logit scale first reaches its cap (a scale that starts at or above the cap is clamped there from "
                 "step 0: a fixed temperature, not the paper's scale that rises to its cap). Knobs: every training "
                 "knob that differs from the paper's recipe. Clarity reference: the encoder Clarity (Tab 3a) measures "
                 "coherence with; it should not be the model's own image tower.",
                 ["model", *(h for h, _ in keys), "width", "scale at cap", "knobs off the paper's recipe",
                  "Clarity reference"], rows)


def towers(model: Model) -> str:
    """The model's towers: its open_clip config (``inline``: params.yaml's), or the pretrained ones."""
    params = model.params
    arch = params.get("model.arch")
    base = "inline" if arch in (None, "None") else arch
    image, text = (params.get(f"model.towers.{t}") for t in ("image", "text"))
    parts = [p for p in (image, text) if p not in (None, "None")]
    if not parts:
        return base
    locked = [t for t in ("image", "text") if params.get(f"model.lock.{t}") == "True"]
    return " + ".join(parts) + (f" (locked: {', '.join(locked)})" if locked else "")


def clarity_reference(model: Model) -> str:
    encoder = model.params.get("reference.encoder")
    if encoder is None:
        return MISSING
    size = model.params.get("reference.image_size")
    name = model.params.get("reference.arch") if encoder == "open_clip" else encoder
    same = " (the model's own image tower!)" if name == model.params.get("model.towers.image") else ""
    return f"{name} at {size} px{same}"


def scale_at_cap(model: Model) -> str:
    """When the learned logit scale reaches its cap, from the model's params and its training curve."""
    try:
        cap = float(model.params["model.logit_scale_cap"])
    except (KeyError, ValueError):
        return MISSING
    if model.params.get("model.logit_scale_mode") == "fixed":
        return "fixed (mode)"
    init = model.params.get("model.init_logit_scale")  # "None": start at the cap
    if init is not None and (init == "None" or math.exp(float(init)) >= cap):
        return "step 0 (starts at the cap)"
    curve = model.curves.get("train/logit_scale", [])
    reached = next((step for step, value in curve if value >= 0.999 * cap), None)
    if reached is not None:
        return f"step {reached}"
    return f"never (ends at {curve[-1][1]:.1f})" if curve else MISSING


def knobs_off_recipe(model: Model) -> str:
    off = [f"{key.split('.', 1)[1]}={model.params[key]}" for key, paper in PAPER_KNOBS.items()
           if key in model.params and model.params[key] != paper]
    return ", ".join(off) or "none"


def params_diff(comparison: Comparison) -> Table:
    rows = [[key, *(values.get(s, MISSING) for s in comparison.sources)] for key, values in comparison.params_diff.items()]
    return Table("params", "Params that differ", "params.yaml values that differ between the experiments.",
                 ["param", *comparison.sources], rows)


def build_tables(comparison: Comparison) -> list[Table]:
    """Every table that has rows, in the paper's order."""
    models = comparison.models
    tables = [params_diff(comparison), models_table(models), zero_shot(models), probes(models), box_and_retrieval(models),
              captions(models), sparsity(models), recovery(models), sae(models), training(models), atlas(models), vlm(models), steering(models)]
    return [t for t in tables if t.rows]
