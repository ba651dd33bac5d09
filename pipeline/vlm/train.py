"""Two-stage VLM training with Ray Train (paper §4): stage 1 trains the adapter alone (encoder
and LM frozen), stage 2 the adapter and the LM's top ``lm_layers`` blocks (all with None). An
optional stage 0 (``vlm.stage0_steps``, not the paper's) first aligns the adapter with the LM's
embeddings of the answer words, without running the LM (:func:`align_adapter`).

Each worker holds the frozen encoder, the LM and its shard of the question-answer pairs; with
several workers the gradients of the trainable parameters are averaged by an explicit
all-reduce (the trainable set changes between stages, which DDP's static buckets do not allow).
Only the trained parameters are saved (``adapter.pt``, ``lm_trained.pt``), not the whole LM.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from pipeline.clip.feature_cache import FeatureCache, cached_split
from pipeline.clip.model import SparseCLIP, load_model
from pipeline.config import Params, VLMParams
from pipeline.data.loading import ClipBatchPreprocessor, load_split_arrays
from pipeline.data.shards import caption_rows
from pipeline.io import check_output_dir, staged_output_dir
from pipeline.runtime import raytrain
from pipeline.vlm.language_model import load_language_model, prepare_language_model
from pipeline.vlm.model import VisionLanguageModel
from pipeline.vlm.questions import qa_from_captions, qa_from_jsonl, qa_from_truth


def build_vlm(encoder_dir: str | Path, lm_dir: str | Path, cfg: VLMParams) -> VisionLanguageModel:
    lm, tokenizer = load_language_model(lm_dir)
    return VisionLanguageModel(load_model(encoder_dir), lm, tokenizer, cfg.features, cfg.adapter_hidden)


def lm_trainable(vlm: VisionLanguageModel, layers: int | None) -> list[torch.nn.Parameter]:
    """Stage 2's LM parameters: the top ``layers`` decoder blocks and the final norm (None: all)."""
    if layers is None:
        return list(vlm.lm.parameters())
    blocks = vlm.lm.model.layers[len(vlm.lm.model.layers) - layers:] if layers else []
    return [p for block in blocks for p in block.parameters()] + list(vlm.lm.model.norm.parameters())


def trained_lm_state(vlm: VisionLanguageModel, layers: int | None) -> dict[str, torch.Tensor]:
    ids = {id(p) for p in lm_trainable(vlm, layers)}
    return {name: p.detach().clone() for name, p in vlm.lm.named_parameters() if id(p) in ids}


def readable_tower_cache(feature_cache: str | Path | None, encoder: SparseCLIP, cfg: VLMParams) -> str | Path | None:
    """``feature_cache`` when the VLM can read its photos from it instead of decoding them: the
    cache holds this encoder's towers, its image tower is the locked, cached one, and the VLM reads
    the pooled embedding (``tokens`` needs the last feature map, which the cache stops before)."""
    usable = (cfg.features == "pooled" and "image" in encoder.cacheable_towers()
              and FeatureCache.available(feature_cache, encoder.params))
    return feature_cache if usable else None


def qa_examples(data_dir: str, split: str, cfg: VLMParams, preprocessor: ClipBatchPreprocessor,
                limit: int | None = None, tower_cache: str | Path | None = None):
    """(images, examples, metas) of one split's photos (each once, however many captions it has;
    ``limit`` counts photos): pairs from ground truth, the captions or ``vlm.qa_path``. The images
    are pixels [N, 3, H, W], or with ``tower_cache`` (:func:`readable_tower_cache`) the cache's
    rows, which :meth:`VisionLanguageModel.sparse_features` reads as it reads pixels (on the
    Flickr8k preset, decoding 2,000 photos and running lite0 on every batch was a fifth of the stage)."""
    decode = tower_cache is None
    arrays, metas = load_split_arrays(data_dir, split, preprocessor, limit=limit, one_per_group=True, decode=decode)
    if cfg.qa_path:
        keys = [m.get("key", "") for m in metas]
        examples = qa_from_jsonl(cfg.qa_path, keys)
    elif any(m.get("truth") for m in metas):
        examples = qa_from_truth(metas, cfg.question_types)
    else:
        captions: dict[str, list[str]] = {}
        for row in caption_rows(data_dir, [split]):
            captions.setdefault(str(row["group"]), []).append(row["text"])
        examples = qa_from_captions(metas, captions, cfg.question_types)
    if not examples:
        raise ValueError(f"no question-answer pairs for the {split} split: the embedded data carries ground "
                         "truth, captioned photos answer the subject question from their captions (is 'subject' "
                         "in vlm.question_types?); anything else needs vlm.qa_path (JSONL of key, question, answer)")
    images = arrays["image"] if decode else cached_split(tower_cache, data_dir, split, limit, one_per_group=True)["image"]
    return torch.from_numpy(images), examples, metas


def held_out_examples(params: Params, vlm: VisionLanguageModel, limit: int | None):
    """:func:`qa_examples` of the test split for a trained VLM (the vlm and steer stages' evaluation),
    read from the tower cache when it holds the VLM's encoder."""
    return qa_examples(params.sample.out_dir, "test", params.vlm, ClipBatchPreprocessor.for_model(vlm.encoder),
                       limit=limit, tower_cache=readable_tower_cache(params.train.feature_cache_in_use, vlm.encoder,
                                                                     params.vlm))


def train_vlm_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: both stages on this rank's share of the pairs; rank 0 reports weights."""
    import ray.train
    import ray.train.torch

    cfg = VLMParams.model_validate(config["vlm"])
    raytrain.set_threads(cfg)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])  # the same adapter init on every rank
    vlm = build_vlm(config["encoder_dir"], config["lm_dir"], cfg)
    device = ray.train.torch.get_device()
    vlm.to(device)
    images, examples, _ = qa_examples(config["data_dir"], "train", cfg, ClipBatchPreprocessor.for_model(vlm.encoder),
                                      limit=cfg.train_images,
                                      tower_cache=readable_tower_cache(config["feature_cache"], vlm.encoder, cfg))
    examples = examples[rank::world]
    sink = raytrain.MetricSink(config.get("tracking_uri"), config.get("run_id"), "vlm/loss") if rank == 0 else None
    loss = two_stage_training(vlm, images, examples, cfg, config["seed"] + rank, world, device,
                              sink.log if sink else None)

    def write(folder: Path) -> None:
        torch.save(vlm.adapter.state_dict(), folder / "adapter.pt")
        torch.save(trained_lm_state(vlm, cfg.lm_layers), folder / "lm_trained.pt")

    raytrain.report({"step": cfg.stage1_steps + cfg.stage2_steps, "loss": loss.item()}, rank, write)


def two_stage_training(vlm: VisionLanguageModel, images: torch.Tensor, examples: list[dict[str, Any]],
                       cfg: VLMParams, seed: int, world: int = 1, device: torch.device | str = "cpu",
                       log=None) -> torch.Tensor:
    """Stage 0 (when asked): the adapter aligned with the answers' word embeddings; stage 1: adapter
    only; stage 2: adapter + the LM's top blocks. Returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    step, local_batch, loss = 0, max(1, cfg.batch_size // world), torch.tensor(float("nan"))
    weights = answer_weights(examples, cfg.answer_balance)
    if cfg.stage0_steps:
        align_adapter(vlm, images, examples, cfg, generator, world, device, log)
    for stage, steps, lr in ((1, cfg.stage1_steps, cfg.stage1_lr), (2, cfg.stage2_steps, cfg.stage2_lr)):
        vlm.lm.requires_grad_(False)
        trainable = list(vlm.adapter.parameters()) + (lm_trainable(vlm, cfg.lm_layers) if stage == 2 else [])
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=True)
        start = time.perf_counter()
        for i in range(steps):
            batch = [examples[j] for j in draw(len(examples), weights, local_batch, generator)]
            loss = vlm.loss(images[[e["image"] for e in batch]].to(device), [e["question"] for e in batch],
                            [e["answer"] for e in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(trainable, world)
            optimizer.step()
            step += 1
            if log and (step % cfg.log_every == 0 or i == steps - 1):
                log({"vlm/loss": loss.item(), "vlm/stage": stage,
                     "vlm/samples_per_s": (i + 1) * cfg.batch_size / (time.perf_counter() - start)}, step)
    return loss


def answer_embeddings(vlm: VisionLanguageModel, images: torch.Tensor, examples: list[dict[str, Any]],
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(the sparse features [N, V, F] of the images that have examples, the target of each: the mean
    of the LM's input embeddings of their answers' tokens, over all of an image's answers)."""
    rows = sorted({e["image"] for e in examples})
    answers: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for e in examples:  # the answer's tokens as the training sequences hold them
            answers.setdefault(e["image"], []).append(vlm._embed_ids(vlm._ids(e["answer"])).float().mean(0))
        targets = torch.stack([torch.stack(answers[r]).mean(0) for r in rows])
        features = torch.cat([vlm.sparse_features(images[rows[s:s + 256]].to(device)) for s in range(0, len(rows), 256)])
    return features, targets


def align_adapter(vlm: VisionLanguageModel, images: torch.Tensor, examples: list[dict[str, Any]], cfg: VLMParams,
                  generator: torch.Generator, world: int = 1, device: torch.device | str = "cpu", log=None) -> float:
    """Stage 0: the adapter alone, trained to put each image's visual token(s) where the LM embeds
    the words of that image's answers (mean squared error against their mean embedding). No LM pass,
    so hundreds of steps cost seconds; the two stages then start from visual tokens that already
    sit among the answer words, instead of learning that through the LM in a few dozen steps (the
    Flickr8k preset's VLM otherwise settles on one subject for every photo). Returns the last loss."""
    features, targets = answer_embeddings(vlm, images, examples, device)
    trainable = list(vlm.adapter.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.stage0_lr, weight_decay=0.0)
    batch = min(len(features), max(1, 64 // world))
    loss = torch.tensor(float("nan"))
    for i in range(cfg.stage0_steps):
        picked = torch.randint(len(features), (batch,), generator=generator)
        visual = vlm.adapter(features[picked.to(features.device)])
        loss = F.mse_loss(visual.float(), targets[picked.to(targets.device)][:, None, :].expand_as(visual))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(trainable, world)
        optimizer.step()
        if log and ((i + 1) % cfg.log_every == 0 or i == cfg.stage0_steps - 1):
            log({"vlm/align_loss": loss.item()}, i + 1)  # its own curve: stage 1 counts from 1 again
    return loss.item()


def answer_weights(examples: list[dict[str, Any]], balance: float) -> torch.Tensor | None:
    """Each example's draw weight, (its answer's count among its question type's examples) ^
    -``balance``, scaled so every question type keeps its share of the draws; None for 0 (uniform).
    Flickr8k's subject answers are skewed ("dog" for about a quarter of the photos), and a VLM trained on
    uniform draws can answer the commonest for every photo."""
    if balance == 0:
        return None
    types = Counter(e["type"] for e in examples)
    answers = Counter((e["type"], e["answer"]) for e in examples)
    mass: Counter[str] = Counter()  # a type's total raw weight: each answer's count x count^-balance
    for (kind, _), count in answers.items():
        mass[kind] += count ** (1 - balance)
    return torch.tensor([answers[e["type"], e["answer"]] ** -balance * types[e["type"]] / mass[e["type"]]
                         for e in examples], dtype=torch.float64)


def draw(examples: int, weights: torch.Tensor | None, n: int, generator: torch.Generator) -> list[int]:
    """``n`` of ``examples`` indices with replacement: uniform without weights (the draw of every
    earlier run, so their results stand), else in proportion to the weights."""
    if weights is None:
        return torch.randint(examples, (n,), generator=generator).tolist()
    return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()


def _average_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def run_vlm_training(params: Params, variant: str, *, run_id: str | None = None,
                     tracking_uri: str | None = None) -> Path:
    """Train the VLM on one encoder variant; write ``<vlm.out_dir>/<variant>/`` and return it."""
    cfg = params.vlm
    lm_dir = prepare_language_model(cfg.language_model, cfg.lm_cache)
    encoder_dir = Path(params.train.out_dir, variant).resolve()
    trainer = raytrain.make_trainer(
        params, "vlm", cfg, train_vlm_worker,
        config={"vlm": cfg.model_dump(mode="json"), "seed": params.project.seed,
                "encoder_dir": str(encoder_dir), "lm_dir": str(Path(lm_dir).resolve()),
                "data_dir": str(Path(params.sample.out_dir).resolve()), "run_id": run_id, "tracking_uri": tracking_uri,
                "feature_cache": _resolved(params.train.feature_cache_in_use)},
        name=f"vlm-{variant}-{run_id or int(time.time())}",
    )
    out = check_output_dir(Path(cfg.out_dir) / variant)  # before training, not after
    result = trainer.fit()
    with staged_output_dir(out, "vlm") as staging, result.checkpoint.as_directory() as folder:
        for name in ("adapter.pt", "lm_trained.pt"):
            shutil.copy(Path(folder) / name, staging / name)
        # paths relative to the final folder, a sibling of staging: the same relative path
        (staging / "vlm.json").write_text(json.dumps({"encoder_dir": _relative_to(encoder_dir, out),
                                                      "lm_dir": _relative_to(lm_dir, out),
                                                      "vlm": cfg.model_dump(mode="json"),
                                                      "final_loss": result.metrics["loss"]}, indent=2))
    raytrain.discard_run_folder(result, params)  # exported above; every run left ~100 MB (1.5 GB seen)
    return out


def _resolved(path: str | Path | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _relative_to(path: str | Path, folder: Path) -> str:
    """``path`` as vlm.json stores it: relative to the VLM's own folder (so the project can move or
    be copied and load its own encoder from anywhere), absolute only across filesystems."""
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive
        return str(Path(path).resolve())


def load_vlm(vlm_dir: str | Path) -> VisionLanguageModel:
    """A trained VLM from its folder (encoder and LM from the paths it recorded, relative to it)."""
    vlm_dir = Path(vlm_dir)
    if not (vlm_dir / "vlm.json").is_file():
        raise FileNotFoundError(f"no trained VLM in {vlm_dir} (vlm.json missing): run the vlm stage, or name "
                                "another vlm/<variant> folder")
    spec = json.loads((vlm_dir / "vlm.json").read_text())
    vlm = build_vlm(vlm_dir / spec["encoder_dir"], vlm_dir / spec["lm_dir"], VLMParams.model_validate(spec["vlm"]))
    vlm.adapter.load_state_dict(torch.load(Path(vlm_dir) / "adapter.pt", weights_only=True))
    missing = vlm.lm.load_state_dict(torch.load(Path(vlm_dir) / "lm_trained.pt", weights_only=True), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{vlm_dir}/lm_trained.pt has parameters the LM lacks: {missing.unexpected_keys[:3]}")
    return vlm.eval()
