"""The post-hoc SAE baseline, measured side by side with Sparse CLIP (paper Tab 1 Prisma row, Tab 3a).

1. The dense baseline's image embeddings of the training split are extracted with the same Ray
   Data actors as everything else, and streamed from Parquet into the SAE trainer.
2. The SAE (:mod:`pipeline.sae`) encodes the dense model's extracted images, captions and
   vocabulary; its codes are written in the same sparse layout as a Sparse CLIP variant's, so
   :func:`pipeline.evaluate.evaluate` measures Clarity, L0, active features, modality (an SAE
   trained on images alone should come out image-only) and concept recovery with the same code.
3. Reconstruction quality (FVU, cosine, L0, dead features; all and outlier rows, as the SAE
   supplementary's Table 6) and the Prisma protocol: zero-shot accuracy when the dense model's
   image embeddings are replaced by their SAE reconstruction.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.activations.inputs import image_rows, image_set
from pipeline.activations.pool import write_sets
from pipeline.config import Params
from pipeline.data.evalsets import zero_shot_label
from pipeline.evaluate import ActivationSet, evaluate
from pipeline.extract import SparseEncoder
from pipeline.io import file_sha256, write_json
from pipeline.sae import (
    SAETrainConfig,
    SparseAutoencoder,
    reconstruction_report,
    train_sae,
)
from pipeline.sparse_io import activation_table, sparse_rows, to_csr
from pipeline.zeroshot import accuracy_from_scores, cosine_scores

CODED_SETS = ("images", "texts", "vocab")


def training_inputs(params: Params, model_dir: Path, out_dir: Path) -> Path:
    """Dense image embeddings of ``sae.train_splits`` (Ray Data actors, resumable), as Parquet."""
    cfg, data_dir = params.sae, Path(params.sample.out_dir).resolve()
    keys = {row["key"] for row in image_rows(data_dir, cfg.train_splits)}
    fingerprint = f"{file_sha256(model_dir / 'model.pt')[:16]}-{params.section_hash('sae')}"
    write_sets("sae-inputs", {"train_inputs": image_set(data_dir, cfg.train_splits, keys)},
               out_dir, fingerprint, {"model_dir": str(model_dir.resolve())}, params.extract, params.ray.task_cpus,
               actor=SparseEncoder)
    return out_dir / "train_inputs"


def stream_dense(path: Path, width: int, batch_size: int = 4096):
    """Per epoch, the dense rows of a Parquet activation set, streamed by Ray Data."""
    import ray.data

    def epoch():
        dataset = ray.data.read_parquet(str(path.resolve()), columns=["indices", "values"])
        for table in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            yield torch.from_numpy(to_csr(table, width).toarray())

    return epoch


def read_dense(path: Path, width: int) -> torch.Tensor:
    """A Parquet activation set read once in this process, dense (the cached path: the trainer
    reshuffles it per epoch; a Ray Data read would spend ~14 s starting workers for a few MB)."""
    return torch.from_numpy(to_csr(pq.read_table(path, columns=["indices", "values"]), width).toarray())


def train_config(params: Params) -> SAETrainConfig:
    cfg = params.sae
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto"
                                                                               else cfg.device)
    return SAETrainConfig(kind=cfg.kind, expansion=cfg.expansion, k=cfg.k, l1_lambda=cfg.l1_lambda, lr=cfg.lr,
                          epochs=cfg.epochs, batch_size=cfg.batch_size, aux_k=cfg.aux_k,
                          dead_after_tokens=cfg.dead_after_tokens, log_every=cfg.log_every,
                          seed=params.project.seed, device=device)


@torch.no_grad()
def write_codes(sae: SparseAutoencoder, source: ActivationSet, out_dir: Path) -> dict[str, int]:
    """SAE codes of the dense model's extracted sets, in the sparse layout, plus a manifest."""
    sae = sae.cpu().eval()
    rows = {}
    for name in CODED_SETS:
        meta, dense = source.load(name)
        codes = sae.encode(torch.from_numpy(dense.toarray()).float())
        table = activation_table({c: meta.column(c).to_pylist() for c in meta.column_names}, *sparse_rows(codes),
                                 sae.W_dec.shape[0])
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out_dir / name / "part-0.parquet")
        rows[name] = table.num_rows
    write_json(out_dir / "manifest.json", {"width": int(sae.W_dec.shape[0]), "rows": rows, "zero_shot_tasks": {},
                                           "source": str(source.dir)})
    return rows


def reconstruction_zero_shot(sae: SparseAutoencoder, source: ActivationSet) -> dict[str, Any]:
    """Prisma protocol: test images' dense embeddings vs their SAE reconstructions, same classifier."""
    if not source.has("prompts"):
        return {}
    meta, images = source.load("images")
    classifiers = source.classifiers()
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
        labels = [spec["classes"].index(zero_shot_label(m, task)) for m in metas]
        out[task] = {"dense": accuracy_from_scores(cosine_scores(dense, classifier), labels),
                     "sae_reconstruction": accuracy_from_scores(cosine_scores(rebuilt, classifier), labels)}
    return out


def run_sae_baseline(params: Params, plot_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train the SAE on the dense baseline and measure it; returns (metrics, training history)."""
    from pipeline.cluster import connect

    cfg = params.sae
    model_dir = Path(params.train.out_dir) / cfg.source_variant
    source = ActivationSet(Path(params.extract.out_dir) / cfg.source_variant)
    out_dir = Path(cfg.out_dir)
    connect(params.ray)
    inputs = training_inputs(params, model_dir, out_dir)
    data = read_dense(inputs, source.width) if cfg.cache_data else stream_dense(inputs, source.width)
    config = train_config(params)
    sae, history = train_sae(data, config)
    torch.save(sae.state_dict(), out_dir / "sae.pt")
    write_json(out_dir / "sae_config.json", {**dataclasses.asdict(config), "d_in": source.width})
    write_codes(sae, source, out_dir)

    _, eval_images = source.load("images")
    result = evaluate(out_dir, params.reference.out_dir, params.vocab.out_dir, params.metrics, plot_dir, title="sae")
    result["reconstruction"] = reconstruction_report(sae.cpu(), torch.from_numpy(eval_images.toarray()).float())
    result["zeroshot_reconstruction"] = reconstruction_zero_shot(sae, source)
    result["source_width"] = source.width
    return result, history
