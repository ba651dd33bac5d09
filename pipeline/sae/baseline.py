"""The post-hoc SAE baselines, measured side by side with Sparse CLIP (paper Tab 1 Prisma row, Tab 3a).

Three SAEs on the dense baseline, all with the SAE supplementary's recipe (BatchTopK, x32, K = 30):

* **image** (the Prisma setting): the final image embeddings of the training split. Its codes of
  the extracted images, captions and vocabulary are written in the same sparse layout as a Sparse
  CLIP variant's, so :func:`pipeline.metrics.evaluate.evaluate` measures Clarity, L0, active features and
  concept recovery with the same code. It never saw text, so it is image-only by construction:
  its modality is not scored (on captions it would only measure how it misreads them).
* **multimodal** (Papadimitriou et al., whom the paper contrasts in §3.1): image and caption
  embeddings together, so Tab 3a's "multimodal %" compares like with like.
* **cls** (the paper's own baseline, Prisma's ``cls@11`` of 12 blocks, with ``sae.cls_layer``): the CLS
  token of the vision tower after a late block (the last but one by default), one row per image.
  Its codes of the evaluated images are written in the variants' layout, so it gets their image
  metrics (L0, active features, Clarity, concept recovery); it has no text side, so no text L0,
  modality, retrieval or C-score.
* **residual** (the supplementary's own setting, with ``sae.residual_layer``): the vision tower's
  residual stream after one block, a few random patch tokens plus CLS per training image;
  reconstruction (FVU, cosine, L0) measured on every token of the evaluation images and on the
  high-norm outlier tokens, as its Table 6. Its CDS needs the main SAE paper's definition, which
  the supplementary only refers to, so it is not computed.

Every input is extracted by the same Ray Data actors as everything else, in one run, and read
from Parquet into the trainer. Reconstruction is reported as the supplementary's Table 6, and
the Prisma protocol: zero-shot accuracy when the dense model's image embeddings are replaced by
their SAE reconstruction.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.activations.extract import SparseEncoder, model_fingerprint
from pipeline.activations.inputs import image_rows, image_set, text_set
from pipeline.activations.pool import write_sets
from pipeline.activations.sparse_io import activation_table, sparse_rows, to_csr
from pipeline.activations.store import ActivationSet
from pipeline.config import Params
from pipeline.data.evalsets import zero_shot_label
from pipeline.data.shards import caption_rows
from pipeline.io import write_json
from pipeline.metrics.evaluate import evaluate
from pipeline.metrics.zeroshot import (
    labelled_rows,
    task_classifiers,
    zero_shot_accuracy,
)
from pipeline.sae import (
    SAETrainConfig,
    SparseAutoencoder,
    reconstruction_report,
    train_sae,
)

CODED_SETS = ("images", "texts", "vocab")
EVAL_SPLIT = "test"  # the token SAE is measured on every token of these images


def training_inputs(params: Params, model_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Every SAE's inputs from the dense model, in one Ray Data run (resumable per set), as Parquet:
    ``train_inputs`` (image embeddings of ``sae.train_splits``), ``train_texts`` (their captions',
    for the multimodal SAE), with ``sae.cls_layer``, ``train_cls`` and ``eval_cls`` (the CLS token of
    that block for the training images and for the images the variants are measured on) and, with
    ``sae.residual_layer``, ``train_tokens`` (sampled residual
    tokens) and ``eval_tokens`` (every residual token of the test images: 65 rows per image, so
    the test split alone gives tens of thousands)."""
    cfg, data_dir = params.sae, Path(params.sample.out_dir).resolve()
    keys = {row["key"] for row in image_rows(data_dir, cfg.train_splits)}
    sets = {"train_inputs": image_set(data_dir, cfg.train_splits, keys)}
    if cfg.multimodal:
        sets["train_texts"] = text_set(caption_rows(data_dir, cfg.train_splits))
    residual = None
    if cfg.residual_layer is not None or cfg.cls_layer is not None:
        residual = {"layer": cfg.residual_layer, "tokens_per_image": cfg.tokens_per_image,
                    "include_cls": cfg.include_cls, "seed": params.project.seed,
                    "cls_layer": cls_block(cfg.cls_layer, model_dir)}
    if cfg.residual_layer is not None:
        eval_keys = {row["key"] for row in image_rows(data_dir, [EVAL_SPLIT])}
        sets["train_tokens"] = image_set(data_dir, cfg.train_splits, keys, kind="residual")
        sets["eval_tokens"] = image_set(data_dir, [EVAL_SPLIT], eval_keys, kind="residual_all")
    if cfg.cls_layer is not None:  # the images every variant is measured on, and the training images
        measured = {row["key"] for row in image_rows(data_dir, params.extract.splits)}
        sets["train_cls"] = image_set(data_dir, cfg.train_splits, keys, kind="residual_cls")
        sets["eval_cls"] = image_set(data_dir, params.extract.splits, measured, kind="residual_cls")
    fingerprint = model_fingerprint(model_dir, ["model.pt"], params.section_hash("sae"), residual)
    cache = str(Path(params.train.feature_cache_dir).resolve()) if params.train.feature_cache else None
    write_sets("sae-inputs", sets, out_dir, fingerprint, {"model_dir": str(model_dir.resolve()), "residual": residual,
                                                          "feature_cache": cache},
               params.extract, params.ray.task_cpus, actor=SparseEncoder)
    return {name: out_dir / name for name in sets}


def cls_block(layer: int | None, model_dir: Path) -> int | None:
    """``sae.cls_layer`` as a block index of the source model, checked before any extraction."""
    from pipeline.clip.model import load_model

    if layer is None:
        return None
    try:
        return load_model(model_dir).block_index(layer)
    except ValueError as err:
        raise ValueError(f"sae.cls_layer={layer}: {err}") from None


def stream_dense(paths: list[Path], width: int, batch_size: int = 4096):
    """Per epoch, the dense rows of Parquet activation sets, streamed by Ray Data; several sets
    are interleaved batch by batch, so no stretch of training sees one set alone."""
    import ray.data

    def read(path: Path):
        dataset = ray.data.read_parquet(str(path.resolve()), columns=["indices", "values"])
        for table in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            yield torch.from_numpy(to_csr(table, width).toarray())

    def epoch():
        streams = [read(p) for p in paths]
        while streams:
            for stream in list(streams):
                batch = next(stream, None)
                if batch is None:
                    streams.remove(stream)
                else:
                    yield batch

    return epoch


def read_dense(paths: list[Path], width: int) -> torch.Tensor:
    """Parquet activation sets read once in this process, dense, stacked (the cached path: the
    trainer reshuffles the rows per epoch; a Ray Data read would spend ~14 s starting workers
    for a few MB). Rows come in (key, token) order: Ray Data names its files by write task, so
    file order differs between runs, and the seeded shuffle must start from the same rows for
    the same SAE to come out."""
    def rows(path: Path):
        table = pq.read_table(path, columns=["key", "token", "indices", "values"])
        return table.sort_by([("key", "ascending"), ("token", "ascending")])

    return torch.cat([torch.from_numpy(to_csr(rows(p), width).toarray()) for p in paths])


def training_data(params: Params, paths: list[Path], width: int):
    return read_dense(paths, width) if params.sae.cache_data else stream_dense(paths, width)


def train_config(params: Params) -> SAETrainConfig:
    """The trainer's config from the ``sae`` params (every key the two share), the project seed
    and the device ``auto`` resolves to."""
    cfg = params.sae
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    shared = {f.name for f in dataclasses.fields(SAETrainConfig)} & set(type(cfg).model_fields) - {"device"}
    return SAETrainConfig(**{name: getattr(cfg, name) for name in shared}, seed=params.project.seed, device=device)


def write_codes(sae: SparseAutoencoder, source: ActivationSet, out_dir: Path) -> dict[str, int]:
    """SAE codes of the dense model's extracted sets, in the sparse layout, plus a manifest."""
    sets = {name: source.load(name) for name in CODED_SETS}
    return write_coded_sets(sae, {name: (meta, torch.from_numpy(dense.toarray())) for name, (meta, dense)
                                  in sets.items()}, out_dir, {"source": str(source.dir)})


@torch.no_grad()
def write_coded_sets(sae: SparseAutoencoder, sets: dict[str, tuple[pa.Table, torch.Tensor]], out_dir: Path,
                     manifest: dict[str, Any] | None = None) -> dict[str, int]:
    """The SAE's codes of each named set of (identifying columns, inputs), in the sparse layout a
    variant's activations have, and the manifest that makes them an activation set."""
    sae = sae.cpu().eval()
    rows = {}
    for name, (meta, inputs) in sets.items():
        codes = sae.encode(inputs.float())
        table = activation_table({c: meta.column(c).to_pylist() for c in meta.column_names}, *sparse_rows(codes),
                                 sae.W_dec.shape[0])
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out_dir / name / "part-0.parquet")
        rows[name] = table.num_rows
    write_json(out_dir / "manifest.json", {"width": int(sae.W_dec.shape[0]), "rows": rows, "zero_shot_tasks": {},
                                           **(manifest or {})})
    return rows


def reconstruction_zero_shot(sae: SparseAutoencoder, source: ActivationSet) -> dict[str, Any]:
    """Prisma protocol: test images' dense embeddings vs their SAE reconstructions, same classifier."""
    if not source.has("prompts"):
        return {}
    meta, images = source.load("images")
    classifiers = task_classifiers(source)
    test = np.asarray(meta.column("split").to_pylist()) == "test"
    dense = images[np.flatnonzero(test)].toarray()
    with torch.no_grad():
        rebuilt = sae.cpu().eval()(torch.from_numpy(dense).float())[0].numpy()
    out: dict[str, Any] = {}
    metas = [json.loads(m) for m, t in zip(meta.column("meta").to_pylist(), test) if t]
    for task, spec in source.manifest["zero_shot_tasks"].items():
        if source.has(f"labelled_{task}"):
            continue  # labelled folders are scored by the metrics stage, on their own images
        classifier = classifiers[task]
        rows, labels = labelled_rows([zero_shot_label(m, task) for m in metas], spec["classes"])
        out[task] = {"dense": zero_shot_accuracy(dense[rows], classifier, labels),
                     "sae_reconstruction": zero_shot_accuracy(rebuilt[rows], classifier, labels)}
    return out


def run_sae_baseline(params: Params, plot_dir: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """Train the SAEs on the dense baseline and measure them; returns (metrics, training history
    per SAE). The image SAE's numbers sit at the top level (Tab 3a's SAE row), the others under
    ``multimodal`` and ``residual``."""
    from pipeline.runtime.cluster import connect

    cfg = params.sae
    model_dir = Path(params.train.out_dir) / cfg.source_variant
    source = ActivationSet(Path(params.extract.out_dir) / cfg.source_variant)
    out_dir = Path(cfg.out_dir)
    connect(params.ray)
    inputs = training_inputs(params, model_dir, out_dir)
    config = train_config(params)
    histories = {}

    sae, histories["image"] = train_sae(training_data(params, [inputs["train_inputs"]], source.width), config)
    torch.save(sae.state_dict(), out_dir / "sae.pt")
    write_json(out_dir / "sae_config.json", {**dataclasses.asdict(config), "d_in": source.width})
    write_codes(sae, source, out_dir)
    _, eval_images = source.load("images")
    result = evaluate(out_dir, params.reference.out_dir, params.vocab.out_dir, params.metrics, plot_dir, title="sae",
                      modality=False)
    result["reconstruction"] = reconstruction_report(sae.cpu(), torch.from_numpy(eval_images.toarray()).float(),
                                                     quantile=cfg.outlier_quantile)
    result["zeroshot_reconstruction"] = reconstruction_zero_shot(sae, source)
    result["source_width"] = source.width

    same_steps = dataclasses.replace(config, steps=histories["image"][-1]["step"])  # as many rows seen
    if cfg.multimodal:
        result["multimodal"], histories["multimodal"] = multimodal_sae(params, source, inputs, same_steps, plot_dir)
    if cfg.cls_layer is not None:
        result["cls"], histories["cls"] = cls_sae(params, model_dir, inputs, same_steps, plot_dir)
    if cfg.residual_layer is not None:
        result["residual"], histories["residual"] = residual_sae(params, model_dir, inputs, same_steps)
    return result, histories


def cls_sae(params: Params, model_dir: Path, inputs: dict[str, Path], config: SAETrainConfig, plot_dir: Path
            ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The paper's SAE baseline (Prisma cls@11): trained on the training images' CLS tokens of a
    late block, then its codes of the measured images scored by :func:`evaluate` as a variant's
    image side is, plus its reconstruction of those CLS tokens."""
    from pipeline.clip.model import load_model

    cfg = params.sae
    model = load_model(model_dir)
    layer, d_in = model.block_index(cfg.cls_layer), model.residual_width(cfg.cls_layer)
    # as many features as the image SAE (and the variants) have, whatever the block's width: Tab 3a
    # then compares dictionaries of one size
    config = dataclasses.replace(config, width=cfg.expansion * model.width)
    sae, history = train_sae(training_data(params, [inputs["train_cls"]], d_in), config)
    out_dir = Path(cfg.out_dir) / "cls"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sae.state_dict(), out_dir / "sae.pt")
    table = pq.read_table(inputs["eval_cls"]).sort_by("key")  # one row per measured image
    tokens = torch.from_numpy(to_csr(table, d_in).toarray())
    write_coded_sets(sae, {"images": (table.select(["key", "group", "split", "meta"]), tokens)}, out_dir)
    result = evaluate(out_dir, params.reference.out_dir, params.vocab.out_dir, params.metrics, plot_dir / "cls",
                      title="cls sae", modality=False)
    result.update({"layer": layer, "d_in": d_in,
                   "reconstruction": reconstruction_report(sae.cpu(), tokens.float(), quantile=cfg.outlier_quantile)})
    return result, history



def multimodal_sae(params: Params, source: ActivationSet, inputs: dict[str, Path], config: SAETrainConfig,
                   plot_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """One SAE on image and caption embeddings together, measured like a Sparse CLIP variant
    (modality included) plus its reconstruction of the evaluation images and captions."""
    out_dir = Path(params.sae.out_dir) / "multimodal"
    data = training_data(params, [inputs["train_inputs"], inputs["train_texts"]], source.width)
    sae, history = train_sae(data, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(sae.state_dict(), out_dir / "sae.pt")
    write_codes(sae, source, out_dir)
    result = evaluate(out_dir, params.reference.out_dir, params.vocab.out_dir, params.metrics,
                      plot_dir / "multimodal", title="multimodal sae")
    evaluated = np.vstack([source.load("images")[1].toarray(), source.load("texts")[1].toarray()])
    result["reconstruction"] = reconstruction_report(sae.cpu(), torch.from_numpy(evaluated).float(),
                                                     quantile=params.sae.outlier_quantile)
    return result, history


def residual_sae(params: Params, model_dir: Path, inputs: dict[str, Path], config: SAETrainConfig
                 ) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The supplementary's token SAE: trained on the sampled residual tokens (for ``config.steps``),
    measured (its Table 6) on every residual token of the evaluation images and on their
    high-norm outliers."""
    from pipeline.clip.model import load_model

    cfg = params.sae
    d_in = load_model(model_dir).residual_width(params.sae.residual_layer)
    sae, history = train_sae(training_data(params, [inputs["train_tokens"]], d_in), config)
    torch.save(sae.state_dict(), Path(cfg.out_dir) / "residual_sae.pt")
    tokens = read_dense([inputs["eval_tokens"]], d_in)
    result = {"layer": cfg.residual_layer, "d_in": d_in, "width": sae.width,
              "train_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in inputs["train_tokens"].glob("*.parquet"))}
    result["reconstruction"] = reconstruction_report(sae.cpu(), tokens.float(), quantile=cfg.outlier_quantile)
    return result, history


CURVES = ("fvu", "l0", "dead_fraction")


def training_curves(histories: dict[str, list[dict[str, float]]]) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of every SAE's training: the image SAE's as ``fvu``, ``l0``, ...
    (the names it always had), the others prefixed (``multimodal.fvu``, ``residual.l0``)."""
    curves: dict[int, dict[str, float]] = {}
    for name, history in histories.items():
        prefix = "" if name == "image" else f"{name}."
        for row in history:
            curves.setdefault(int(row["step"]), {}).update(
                {f"{prefix}{k}": v for k, v in row.items() if k != "step"})
    return curves


def plot_training(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """FVU, L0 and dead fraction against steps, one line per SAE."""
    from pipeline.plots import plot_curves

    prefixes = ["" if name == "image" else f"{name}." for name in histories]
    return plot_curves(training_curves(histories), [[f"{p}{k}" for p in prefixes] for k in CURVES], path,
                       title="SAE training")
