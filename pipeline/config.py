"""Typed, validated pipeline parameters, loaded from ``params.yaml``.

Every stage reads its configuration through :func:`load_params` and nothing else, so a typo in
``params.yaml`` fails before any work starts, with a message naming the key, the value and what
was expected. The same file drives the embedded CPU run and a multi-node GPU run: only values
change, never code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

# Stages run from the project root (DVC runs every command there), so relative paths in
# params.yaml, and the params file itself, resolve against the working directory.
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A params file that cannot be used; the message lists every problem found."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------- output paths


# Folders besides the project where output folders may also lie (os.pathsep-separated): a
# cluster's scratch space, or the test suite's temporary folders. Set by the environment, never
# by a params file.
OUTPUT_ROOTS_ENV = "SPARSECLIP_OUTPUT_ROOTS"


def _inside_project(value: str) -> str:
    """An output folder resolves strictly inside the project (the working directory every stage
    runs in) or one of ``$SPARSECLIP_OUTPUT_ROOTS``: never the project itself, a parent of it, or a
    link out of it. Stages replace their output folders whole, so ``out_dir: .`` or ``..`` would
    otherwise delete the project."""
    project = Path.cwd().resolve()
    resolved = (project / value).resolve()
    extra = [Path(p).resolve() for p in os.environ.get(OUTPUT_ROOTS_ENV, "").split(os.pathsep) if p]
    if resolved == project or resolved in project.parents or not any(root in resolved.parents
                                                                     for root in [project, *extra]):
        raise ValueError(f"resolves to {resolved}, which is not a folder inside the project ({project}); "
                         "an output folder must be a subfolder of the project, e.g. 'data/sample'")
    return value


def _not_above_project(value: str) -> str:
    """A folder shared beyond the project (Ray storage, a model cache) may live anywhere (an NFS
    mount, ``s3://``), but never at the filesystem root, the project itself or one of its parents,
    whose run folders a stage deletes when it is done with them."""
    if "://" in value:
        return value
    root, resolved = Path.cwd().resolve(), (Path.cwd() / value).resolve()
    if resolved == root or resolved in root.parents or resolved == Path(resolved.anchor):
        raise ValueError(f"resolves to {resolved}, the project or a folder above it; use a folder of "
                         "its own, e.g. 'ray_results'")
    return value


OutputDir = Annotated[str, AfterValidator(_inside_project)]
SharedDir = Annotated[str, AfterValidator(_not_above_project)]


# --------------------------------------------------------------------------- project-wide


class ProjectParams(Section):
    """The pipeline's MLflow experiment and the global seed."""

    experiment: str = Field("sparseclip", min_length=1, description="MLflow experiment: one per pipeline")
    seed: int = Field(0, ge=0)


class RayParams(Section):
    """Which Ray cluster the stages join, or the size of the local one they start."""

    address: str | None = Field(
        None, description="Ray cluster to join; None: $RAY_ADDRESS if set, else a local cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all)")
    task_cpus: float = Field(
        0.5, gt=0, description="CPUs per Ray Data task/actor; fractional so 2-core machines never deadlock"
    )
    storage_path: SharedDir = Field(
        "ray_results", description="Ray Train storage that all nodes share: local path, NFS mount or s3://"
    )
    wait_for_resources: bool = Field(
        False, description="false: a training whose workers the cluster cannot hold fails at once, naming what "
        "is missing; true: wait (an autoscaling cluster adds nodes)")


# --------------------------------------------------------------------------- sample stage


class GeneratorParams(Section):
    """The embedded concept dataset (:mod:`pipeline.data.generator`)."""

    num_records: int = Field(4000, ge=1)
    image_size: int = Field(64, ge=32, le=1024)
    max_objects: int = Field(3, ge=1, le=6)
    word_probability: float = Field(0.35, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)


class SourceParams(Section):
    """Where the sample stage reads image-caption pairs: the embedded concept generator, an open_clip
    CSV, webdataset tars (img2dataset's layout) or Parquet files with image bytes."""

    kind: Literal["generated", "csv", "webdataset", "parquet"] = "generated"
    path: str | None = Field(None, description="csv file, or a glob of .tar / .parquet files")
    image_key: str = Field("image", description="csv/parquet column, or tar member extension ('jpg')")
    caption_key: str = Field("caption", description="csv/parquet column, or tar member extension ('txt')")
    image_root: str | None = Field(None, description="csv: folder that image paths are relative to")
    csv_separator: str = ","
    require_sidecar: bool = Field(True, description="webdataset: a sample without its .json is skipped")
    generator: GeneratorParams = GeneratorParams()

    @model_validator(mode="after")
    def _path_for_external_sources(self) -> SourceParams:
        if self.kind != "generated" and not self.path:
            raise ValueError(f"source.kind={self.kind!r} needs source.path (a file or glob)")
        return self


class SplitParams(Section):
    """Split fractions; a record's split is a hash of its group (all captions of one photo land in
    one split). They sum to 1."""

    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class SampleParams(Section):
    """The sample stage: a seeded subset of the source, validated record by record and written as
    webdataset tar shards with a Parquet index."""

    source: SourceParams = SourceParams()
    n: int | None = Field(None, ge=1, description="pairs to sample (None: the whole source)")
    seed: int = Field(0, ge=0)
    splits: SplitParams = SplitParams()
    shard_size: int = Field(1000, ge=1, description="records per webdataset tar shard")
    min_image_side: int = Field(16, ge=1, description="smaller images are skipped as 'image_too_small'")
    max_aspect_ratio: float = Field(4.0, ge=1.0, description="longer/shorter side above this is skipped")
    out_dir: OutputDir = "data/sample"


# --------------------------------------------------------------------------- train stage

# The embedded default: a ViT small enough to train on 2 CPU cores in about a minute.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


class TowerParams(Section):
    """Pretrained towers that ship offline (:mod:`pipeline.clip.towers`), in place of the image or
    text tower of ``arch`` / ``inline``; ``embed_dim`` stays that config's."""

    image: Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"] | None = Field(
        None, description="ImageNet EfficientNet-lite as a timm tower (average pool, linear projection); "
        "None: the config's vision tower")
    text: Literal["all-minilm-l6-v2"] | None = Field(
        None, description="all-MiniLM-L6-v2 as a Hugging Face tower (mean pooling, linear projection); "
        "None: the config's text tower")
    image_size: int | None = Field(None, ge=32, description="input size of the image tower (None: its own: "
                                   "224 / 240 / 260 for lite0 / 1 / 2)")
    context_length: int = Field(32, ge=4, le=512, description="tokens per caption for the text tower")


class LockParams(Section):
    """Frozen towers, as open_clip's ``--lock-image`` / ``--lock-text`` flags freeze them."""

    image: bool = Field(False, description="freeze the image tower (its projection stays trainable)")
    image_unlocked_groups: int = Field(0, ge=0, description="last layer groups of the image tower left trainable")
    image_freeze_bn_stats: bool = Field(True, description="locked batch-norm layers keep their running statistics")
    text: bool = Field(False, description="freeze the text tower (its projection stays trainable)")
    text_unlocked_layers: int = Field(0, ge=0, description="last layers of the text tower left trainable")
    text_freeze_layer_norm: bool = Field(True, description="locked layer norms stay frozen too")

    @property
    def image_fully(self) -> bool:
        return self.image and self.image_unlocked_groups == 0

    @property
    def text_fully(self) -> bool:
        return self.text and self.text_unlocked_layers == 0


class ModelParams(Section):
    """The Sparse CLIP architecture (:mod:`pipeline.clip.model`); variants override any of these."""

    arch: str | None = Field(None, description="open_clip config name (ViT-B-32, ViT-L-14); None: inline")
    inline: dict[str, Any] = Field(default_factory=lambda: json.loads(json.dumps(TINY_CLIP)))
    checkpoint: str | None = Field(None, description="local open_clip state dict to start from")
    towers: TowerParams = TowerParams()
    lock: LockParams = LockParams()
    expansion: int = Field(32, ge=0, description="head width = embed_dim x expansion; 0 = dense baseline")
    activation: Literal["relu", "none", "topk", "l1"] = "relu"
    topk: int = Field(64, ge=1, description="k for activation=topk")
    topk_selection: Literal["centred", "raw"] = Field(
        "centred", description="topk picks the k largest pre-activations minus each feature's running mean "
        "(centred, as Gao et al. centre the SAE input) or the raw ones (which can settle on the same k for every input)")
    l1_lambda: float = Field(1e-3, ge=0.0, description="penalty weight for activation=l1")
    pooling: Literal["cls", "avg"] = "cls"
    logit_scale_cap: float = Field(100.0, gt=1.0, description="max of exp(logit_scale): 100 CLIP, 50 Sparse, 40 Sparse+")
    init_logit_scale: float | None = Field(
        math.log(1 / 0.07), ge=0.0, description="initial ln(scale), clamped to the cap as open_clip clamps after "
        "each step; None: start at the cap, ln(logit_scale_cap)"
    )
    logit_scale_mode: Literal["learnable", "fixed"] = Field(
        "learnable", description="learnable (the paper: trained, clamped to the cap) | fixed (held at its start value)")
    head_bias_init: float | None = Field(
        None, description="constant start value of the wide heads' biases; None: torch's default uniform init "
        "(the paper's recipe). Negative values start the ReLU head sparser")

    @property
    def initial_logit_scale(self) -> float:
        cap = math.log(self.logit_scale_cap)
        return cap if self.init_logit_scale is None else min(self.init_logit_scale, cap)

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.arch is None and not {"embed_dim", "vision_cfg", "text_cfg"} <= set(self.inline):
            raise ValueError("inline needs embed_dim, vision_cfg and text_cfg (or set arch)")
        if self.activation == "topk" and (self.head_bias_init or 0.0) < 0:
            raise ValueError(f"head_bias_init {self.head_bias_init} with activation topk: when every kept "
                             "pre-activation starts below 0, ReLU(TopK) emits zeros and the heads get no gradient; "
                             "use null or a value >= 0 (TopK sets its sparsity by topk)")
        return self


def _overrides_of(base: type[Section], name: str, exclude: set[str]) -> type[Section]:
    """A section whose keys are ``base``'s (less ``exclude``), each optional with None meaning
    "as the base": derived, so a new model knob is overridable per variant the day it exists,
    with the same type, bounds and description."""
    fields: dict[str, Any] = {}
    for key, info in base.model_fields.items():
        if key not in exclude:
            kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            fields[key] = (Optional[kind], Field(None, description=info.description))  # noqa: UP045
    return create_model(name, __base__=Section, __doc__=f"Per-variant overrides of :class:`{base.__name__}` "
                        "(only the keys given change).", **fields)


# The towers, their weights and their locks are the run's, not a variant's: every variant shares
# them (and the feature cache that encodes locked towers once).
VariantParams = _overrides_of(ModelParams, "VariantParams", exclude={"inline", "checkpoint", "towers", "lock"})


# The paper's models: the dense baseline, Sparse (cap 50), Sparse+ (cap 40), Sparse-Avg.
PAPER_VARIANTS = {
    "dense": VariantParams(expansion=0, activation="none", logit_scale_cap=100),
    "sparse": VariantParams(logit_scale_cap=50),
    "sparse_plus": VariantParams(logit_scale_cap=40),
    "sparse_avg": VariantParams(logit_scale_cap=50, pooling="avg"),
}


class OptimParams(Section):
    """open_clip's recipe: AdamW, linear warmup then cosine decay."""

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip_norm: float | None = Field(None, gt=0)
    head_lr_multiplier: float = Field(
        1.0, gt=0, description="learning rate of the wide sparse heads = lr x this (1: the paper's recipe)")
    head_weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay of the heads' weights (None: weight_decay). torch's AdamW "
        "decays by lr x decay, so the multiplier scales the heads' decay per step too")

    @property
    def neutral_heads(self) -> bool:
        """True when the heads are optimised exactly like every other weight (the paper's recipe)."""
        return self.head_lr_multiplier == 1.0 and self.head_weight_decay in (None, self.weight_decay)


class WorkerGroupParams(Section):
    """How a Ray Train stage places its workers; ``train`` and ``vlm`` each carry these keys."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a cluster)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 0.5})
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch threads per worker; None: the worker's default (OMP_NUM_THREADS)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where Ray puts the workers: PACK fills a node first (NCCL stays on NVLink); "
        "SPREAD puts them on different nodes when it can")

    @field_validator("resources_per_worker")
    @classmethod
    def _finite_amounts(cls, resources: dict[str, float]) -> dict[str, float]:
        """Ray takes NaN or a negative amount and then never places the worker, or fails deep
        inside; name the resource here instead."""
        bad = {key: amount for key, amount in resources.items() if not (math.isfinite(amount) and amount >= 0)}
        if bad:
            raise ValueError(f"resource amounts must be finite numbers >= 0; got {', '.join(f'{k}: {v}' for k, v in bad.items())}")
        return resources


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class TrainParams(WorkerGroupParams):
    """The train stage: one Ray Train run per variant, from ``model`` with the variant's overrides;
    the worker-group keys (``num_workers`` to ``placement_strategy``) place its workers."""

    model: ModelParams = ModelParams()
    optim: OptimParams = OptimParams()
    variants: dict[str, VariantParams] = Field(default_factory=lambda: dict(PAPER_VARIANTS))  # type: ignore[valid-type]
    epochs: int = Field(20, ge=1)
    global_batch_size: int = Field(128, ge=2)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU")
    grad_checkpointing: bool = False
    loss: Literal["clip", "tiled"] = Field(
        "clip", description="clip: open_clip's ClipLoss (gathers every embedding); tiled: the exact ring-tiled "
        "loss whose memory does not grow with global batch x width (pipeline/clip/tiled_loss.py)")
    sparse_transport_density: float | None = Field(
        None, gt=0, le=1, description="tiled: send embedding blocks as (index, value) pairs below this density; "
        "None: dense. Sparse blocks send fewer bytes but cost time to pack and unpack, so set it from "
        "benchmarks/sparse_transport.py run on the transport in use")
    cache_data: bool = Field(True, description="each worker decodes its slice of the train split once, in its "
                             "own process, and keeps it in memory (false: Ray Data streams every epoch)")
    feature_cache: bool = Field(True, description="when both towers are fully locked, train from their outputs, "
                                "encoded once by the tower_cache stage (pipeline/clip/feature_cache.py)")
    feature_cache_dir: OutputDir = Field("data/tower_features", description="where the tower_cache stage writes")
    log_every: int = Field(10, ge=1, description="steps between training metrics")
    eval_every: int = Field(100, ge=1, description="steps between zero-shot evaluations on val")
    val_images: int = Field(2000, ge=1, description="val images scored at each evaluation (the metrics stage "
                            "scores every image of the extracted sets)")
    checkpoint_every: int = Field(100, ge=1, description="steps between resume checkpoints")
    evolution: list[float] = Field([0.01, 0.03, 0.1, 0.3, 1.0], description="fractions of training to snapshot")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")
    keep_ray_checkpoints: bool = Field(False, description="keep Ray's checkpoint folder after export")
    out_dir: OutputDir = "models"

    @field_validator("variants", mode="before")
    @classmethod
    def _drop_null_variants(cls, variants: Any) -> Any:
        """``name: null`` removes a variant: an override file merges into params.yaml key by key, and
        this is how it drops one (deploy/params.flickr8k.yaml drops Sparse-Avg)."""
        if isinstance(variants, dict):
            return {name: spec for name, spec in variants.items() if spec is not None}
        return variants

    @model_validator(mode="after")
    def _valid(self) -> TrainParams:
        if not self.variants:
            raise ValueError("variants: define at least one")
        if any(not 0 < f <= 1 for f in self.evolution):
            raise ValueError(f"evolution fractions must be in (0, 1], got {self.evolution}")
        if self.global_batch_size % self.num_workers:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by "
                             f"num_workers {self.num_workers}")
        for name in self.variants:
            if not VARIANT_NAME.fullmatch(name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_' and '-' (at most 64, starting "
                                 "with a letter or digit); it names folders (models/<name>, activations/<name>) "
                                 "and DVC stages, so '..', '/' or spaces could write or delete outside them")
            self.model_for(name)  # every variant must yield a valid model
        return self

    def model_for(self, variant: str) -> ModelParams:
        """The base model params with the variant's overrides applied (and validated)."""
        if variant not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; params.yaml defines: {', '.join(self.variants)}")
        overrides = self.variants[variant].model_dump(exclude_none=True)
        return ModelParams.model_validate({**self.model.model_dump(), **overrides})


# --------------------------------------------------------------------------- analysis stages


class VocabParams(Section):
    """The naming vocabulary (paper §3.2) and the SBERT sample for the text C-score."""

    source: Literal["builtin", "file"] = Field("builtin", description="builtin: WordNet + common words + concepts")
    path: str | None = Field(None, description="source=file: one word per line")
    common_words: int = Field(20000, ge=0, description="most frequent English words merged in (wordfreq)")
    max_words: int | None = Field(None, ge=1, description="cap on the vocabulary size (None: all)")
    cscore_words: int = Field(10000, ge=2, description="words embedded with SBERT for the C-score")
    seed: int = Field(0, ge=0)
    out_dir: OutputDir = "data/vocab"

    @model_validator(mode="after")
    def _path_for_file(self) -> VocabParams:
        if self.source == "file" and not self.path:
            raise ValueError("vocab.source=file needs vocab.path")
        return self


class ReferenceParams(Section):
    """The dense image encoder Clarity is measured with (the paper: OpenAI CLIP, not offline)."""

    encoder: Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "open_clip"] = "efficientnet-lite0"
    arch: str | None = Field(None, description="encoder=open_clip: config name")
    checkpoint: str | None = Field(None, description="encoder=open_clip: local weights")
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(64, ge=1)
    out_dir: OutputDir = "activations/reference"

    @model_validator(mode="after")
    def _open_clip_needs_weights(self) -> ReferenceParams:
        if self.encoder == "open_clip" and not (self.arch and self.checkpoint):
            raise ValueError("reference.encoder=open_clip needs arch and checkpoint (random weights mean nothing)")
        return self


class ExtractParams(Section):
    """Ray Data extraction of sparse activations (images, captions, vocabulary, eval sets)."""

    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"], min_length=1)
    batch_size: int = Field(128, ge=1)
    actors: int = Field(2, ge=1, description="Ray Data actors, each with a model loaded once")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU actors)")
    token_sample: int = Field(64, ge=0, description="test images whose per-token activations are kept")
    evolution_vocab: int = Field(2000, ge=0, description="vocabulary head encoded at each evolution snapshot "
                                 "(with the test images and captions); 0: no evolution sets")
    labelled_folders: dict[str, str] = Field(default_factory=dict,
                                             description="name -> folder of class-named subfolders (ImageNet layout)")
    out_dir: OutputDir = "activations"


class MetricsParams(Section):
    """The metrics stage: Clarity's tau and n_min (the paper's Eq. 2), the text C-score's activation
    thresholds, the top-k cuts of zero-shot, the AUROC at which one feature counts as a concept's
    detector (``mono_auroc``), open-vocabulary tagging and threads."""

    clarity_tau: float = Field(0.001, ge=0)
    n_min: int = Field(2, ge=2)
    cscore_thresholds: list[float] = Field([0.0, 0.5, 1.0, 1.5], min_length=1)
    topk: list[int] = Field([1, 2, 4, 8, 16, 32], description="zero-shot with each image's top-k features")
    mono_auroc: float = Field(0.9, gt=0.5, le=1.0)
    tag_words: int = Field(50, ge=0, description="open-vocabulary tagging: the most frequent caption nouns scored on "
                           "the test images (0: off)")
    tag_min_images: int = Field(10, ge=1, description="tagging: a noun tags at least this many test images")
    threads: int | None = Field(None, ge=1, description="threads for the row blocks of Clarity, zero-shot and "
                                "top-k (None: one per core); the numbers do not depend on it")
    out_dir: OutputDir = "metrics"


class SAEParams(Section):
    """The post-hoc SAE baseline (the SAE supplementary's recipe: BatchTopK, expansion 32, K = 30)."""

    source_variant: str = Field("dense", description="the train.variants entry whose embeddings the SAE reads")
    kind: Literal["batchtopk", "topk", "relu"] = "batchtopk"
    expansion: int = Field(32, ge=1)
    k: int = Field(30, ge=1)
    l1_lambda: float = Field(0.0, ge=0, description="kind=relu: L1 weight")
    lr: float = Field(4e-4, gt=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4096, ge=2)
    aux_k: int = Field(512, ge=1, description="AuxK: dead features used to model the residual")
    dead_after_tokens: int = Field(20480, ge=1)
    log_every: int = Field(100, ge=1)
    train_splits: list[Literal["train", "val", "test"]] = Field(["train"], min_length=1)
    multimodal: bool = Field(True, description="also train one SAE on the image and caption embeddings together "
                             "(Papadimitriou et al.'s setting, which the paper contrasts in §3.1)")
    residual_layer: int | None = Field(None, ge=0, description="also train an SAE on the vision tower's residual "
                                       "tokens after this block (0-based; the SAE supplementary's setting); None: off")
    tokens_per_image: int = Field(4, ge=1, description="random patch tokens per training image (the supplementary: 4)")
    include_cls: bool = Field(True, description="add each training image's CLS token to its patch tokens")
    cls_layer: int | None = Field(-2, description="also train the paper's SAE baseline: an SAE on the CLS token of the "
                                  "vision tower after this block (Prisma's cls@11 of 12 blocks: -2, the last but one; "
                                  "negative counts from the end), scored with the variants' metrics; None: off")
    outlier_quantile: float = Field(0.99, gt=0, lt=1, description="outlier rows: norm above this quantile of "
                                    "the evaluated rows' norms (the supplementary picks its tau from that distribution)")
    cache_data: bool = Field(True, description="read the training embeddings once (false: stream every epoch)")
    device: str = Field("auto", description="auto: cuda when available")
    out_dir: OutputDir = "activations/sae"

    @model_validator(mode="after")
    def _relu_needs_l1(self) -> SAEParams:
        if self.kind == "relu" and self.l1_lambda == 0:
            raise ValueError("sae.kind=relu needs sae.l1_lambda > 0")
        return self


# --------------------------------------------------------------------------- the whole file


class AtlasParams(Section):
    """Concept naming, feature evolution, heatmaps and the HTML feature atlas."""

    variants: list[str] | None = Field(None, description="models to map (None: every train.variants entry)")
    top_words: int = Field(10, ge=1, description="vocabulary words kept per feature")
    min_word_count: int = Field(5, ge=0, description="name with words the training captions use this often "
                                "(0: the whole vocabulary, as the paper's web-scale model)")
    top_images: int = Field(8, ge=1, description="images kept per feature")
    grid_features: int = Field(12, ge=1, description="rows of the Fig 4 feature grid")
    evolution_features: int = Field(6, ge=1, description="rows of the Fig 5 evolution strip")
    heatmap_images: int = Field(6, ge=1, description="rows of the heatmap panel")
    heatmap_models: list[str] = Field(["sparse_avg", "sparse"], description="models drawn side by side in the "
                                      "heatmap panel (avg vs cls pooling); those not mapped are left out")
    out_dir: OutputDir = "reports/atlas"


class VLMParams(WorkerGroupParams):
    """The VLM on a frozen encoder (paper §4): adapter + LM, two-stage training, QA evaluation."""

    variants: list[str] = Field(["sparse_plus", "dense"], min_length=1, description="encoders to build a VLM on")
    language_model: str = Field("smollm2-135m-instruct", description="smollm2-135m-instruct (packaged) or a local "
                                "Hugging Face model folder, e.g. Llama-3.1-8B-Instruct")
    lm_cache: SharedDir = Field(".cache/lm", description="where the packaged GGUF model is converted to, once")
    features: Literal["pooled", "tokens"] = Field("pooled", description="pooled embedding (1 visual token) or "
                                                  "every spatial token's sparse features")
    adapter_hidden: int = Field(1024, ge=1)
    question_types: list[str] = Field(["subject", "colour", "count", "text"], min_length=1)
    qa_path: str | None = Field(None, description="JSONL {key, type, question, answer} instead of ground truth")
    stage1_steps: int = Field(40, ge=0, description="adapter only")
    stage2_steps: int = Field(40, ge=0, description="adapter + LM top lm_layers blocks")
    stage1_lr: float = Field(1e-3, gt=0)
    stage2_lr: float = Field(5e-5, gt=0)
    lm_layers: int | None = Field(None, ge=0, description="LM blocks trained in stage 2, from the top (None: the "
                                  "whole LM, the paper's 'adapter and LLM together'; a number saves memory and time)")
    batch_size: int = Field(16, ge=1)
    log_every: int = Field(5, ge=1)
    train_images: int | None = Field(None, ge=1, description="training photos decoded for the VLM (None: the "
                                     "whole train split; each is held in memory at the encoder's input size)")
    eval_images: int = Field(64, ge=1, description="held-out test images for QA evaluation")
    eval_batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    out_dir: OutputDir = "vlm"


class SteerParams(Section):
    """Steering evaluation (Fig 8b): suppress the true label's features, boost another label's."""

    variant: str = Field("sparse_plus", description="whose VLM is steered (one of vlm.variants; the paper's: Sparse+)")
    question_types: list[Literal["subject", "colour", "count", "text"]] = Field(
        ["colour", "subject"], min_length=1, description="questions asked, each steered on its own answers as "
        "labels (subject: the paper's question)")
    ks: list[int] = Field([1, 2, 4, 16], min_length=1, description="features per concept word (K)")
    strengths: list[float] = Field([2.0, 5.0], min_length=1, description="steering strengths (SS)")
    images: int = Field(96, ge=1, description="test images (each cell's rates carry a 95% interval)")
    max_new_tokens: int = Field(24, ge=1, description="tokens every steering answer may run to: several times "
                                "vlm.max_new_tokens, so that abnormally long (corrupted) answers can show")
    max_words: int | None = Field(None, ge=1, description="an answer with more words is corrupted; None: the "
                                  "corruption_quantile of the unedited answers' own word counts")
    corruption_quantile: float = Field(0.99, gt=0.0, le=1.0)
    out_dir: OutputDir = "metrics"


class ReportParams(Section):
    """The comparison report (``reports/comparison``): paper-shaped tables and overlaid training
    curves. By default the latest FINISHED run of each stage and variant in the experiment."""

    experiment: str | None = Field(None, description="MLflow experiment to read (None: project.experiment)")
    runs: list[str] = Field(default_factory=list, description="MLflow run ids to compare instead")
    dvc_exps: list[str] = Field(default_factory=list, description="DVC experiments to compare instead "
                                "(names or revs; their stage runs carry the tag dvc_exp)")
    out_dir: OutputDir = "reports/comparison"
    claims_file: OutputDir = Field("reports/claims.json", description="the verdicts on the paper's claims of the "
                                   "first source compared, as a DVC metrics file (`dvc metrics diff` shows a flip); "
                                   "outside metrics/, which the report reads as a whole")

    @model_validator(mode="after")
    def _one_source(self) -> ReportParams:
        if self.runs and self.dvc_exps:
            raise ValueError("give runs or dvc_exps, not both")
        return self


class AblationParams(Section):
    """The paper's small-scale ablation (Fig 2a-c, :mod:`pipeline.clip.ablation`): many short in-process
    trainings of the base ``train.model`` / ``train.optim``, each panel varying one choice."""

    steps: int = Field(300, ge=1, description="training steps per point")
    batch_size: int = Field(128, ge=2)
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="every point is trained once per seed")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    val_images: int = Field(500, ge=1, description="val images scored at each eval")
    expansions: list[int] = Field([1, 2, 4, 8, 16, 32], description="Fig 2a: head widths (x embed_dim); [] skips it")
    expansion_activations: list[Literal["relu", "none"]] = Field(["relu", "none"], description="Fig 2a: lines")
    activations: list[Literal["relu", "topk", "l1"]] = Field(["relu", "topk", "l1"],
                                                             description="Fig 2b: sparsity methods; [] skips it")
    scale_caps: list[float] = Field([2, 4, 6, 8, 10, 12, 100], description="Fig 2c: logit scale caps; [] skips "
                                    "it (pick caps that bind: a cap above the scale the run learns changes nothing)")
    recipes: list[Literal["paper", "embedded"]] = Field(
        ["paper", "embedded"], min_length=1, description="the knobs every point trains with, each its own line: "
        "paper (heads at torch's init and the towers' lr) or embedded (train.model's head_bias_init and "
        "train.optim's head_lr_multiplier), TopK included either way")
    scale_mode: Literal["learnable", "fixed"] = Field(
        "learnable", description="Fig 2c: the paper's learnable scale under each cap, or a scale fixed at it")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per point (a Ray task); points run side by side")
    threads_per_task: int = Field(1, ge=1, description="torch threads inside each point")
    use_gpu: bool = Field(False, description="one GPU per point (task_cpus then also applies)")
    out_dir: OutputDir = "plots/ablation"

    @model_validator(mode="after")
    def _something_to_run(self) -> AblationParams:
        if not (self.expansions or self.activations or self.scale_caps):
            raise ValueError("ablation: expansions, activations and scale_caps are all empty")
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"ablation.expansions must be >= 1 (1 = the embed_dim itself), got {self.expansions}")
        if any(c <= 1 for c in self.scale_caps):
            raise ValueError(f"ablation.scale_caps must be > 1, got {self.scale_caps}")
        return self


class Params(Section):
    project: ProjectParams = ProjectParams()
    ray: RayParams = RayParams()
    sample: SampleParams = SampleParams()
    train: TrainParams = TrainParams()
    vocab: VocabParams = VocabParams()
    reference: ReferenceParams = ReferenceParams()
    extract: ExtractParams = ExtractParams()
    metrics: MetricsParams = MetricsParams()
    sae: SAEParams = SAEParams()
    atlas: AtlasParams = AtlasParams()
    vlm: VLMParams = VLMParams()
    steer: SteerParams = SteerParams()
    report: ReportParams = ReportParams()
    ablation: AblationParams = AblationParams()

    @model_validator(mode="after")
    def _sae_source_is_a_variant(self) -> Params:
        if self.sae.source_variant not in self.train.variants:
            raise ValueError(f"sae.source_variant {self.sae.source_variant!r} is not one of train.variants "
                             f"({', '.join(self.train.variants)})")
        unknown = [v for v in [*(self.atlas.variants or []), *self.vlm.variants] if v not in self.train.variants]
        if unknown:
            raise ValueError(f"atlas/vlm variants {unknown} are not train.variants ({', '.join(self.train.variants)})")
        if self.steer.variant not in self.vlm.variants:
            raise ValueError(f"steer.variant {self.steer.variant!r} is not one of vlm.variants {self.vlm.variants}")
        if missing := [t for t in self.steer.question_types if t not in self.vlm.question_types]:
            raise ValueError(f"steer.question_types {missing} are not in vlm.question_types {self.vlm.question_types}: "
                             "the steered VLM is trained and asked only those")
        if self.steer.max_new_tokens <= self.vlm.max_new_tokens:
            raise ValueError(f"steer.max_new_tokens {self.steer.max_new_tokens} must exceed vlm.max_new_tokens "
                             f"{self.vlm.max_new_tokens}: answers cut at the normal length can never be abnormally "
                             "long, and the corruption rate would be 0 by construction")
        read = {"train": "train", "val": "train (validation)"} | {s: "extract.splits" for s in self.extract.splits}
        read |= {s: "sae.train_splits" for s in self.sae.train_splits if s not in read}
        empty = [f"{split} (read by {reader})" for split, reader in read.items() if self.sample.splits.as_dict()[split] == 0]
        if empty:
            raise ValueError(f"sample.splits gives fraction 0 to {', '.join(empty)}: the pipeline would sample "
                             "nothing there and fail later; give each a share")
        return self

    def atlas_variants(self) -> list[str]:
        return list(self.atlas.variants or self.train.variants)

    def section_hash(self, name: str) -> str:
        """Short content hash of one section, the 'DVC params hash' tagged on MLflow runs."""
        payload = json.dumps(getattr(self, name).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# The check_params stage's output, a dependency of every other DVC stage (stages/check_params.py).
CHECKED_PARAMS = Path("data/params_checked.json")


def checked_params_record() -> dict[str, str]:
    """What the check stage writes: constant, so that a params change reruns only the stages whose
    own params changed (DVC compares this file's hash, which stays the same), while a params file
    that does not validate stops ``dvc repro`` before any stage."""
    return {"checked_by": "pipeline.config.load_params",
            "meaning": "params.yaml validated before any other stage ran (variant names, output folders, values)"}


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values (for tests, CLIs).

    Raises :class:`ParamsError` naming the file, each bad key, its value and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "\n".join(f"  - {_describe(e)}" for e in err.errors())
        raise ParamsError(f"{path}: invalid params:\n{problems}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (the context, a caret drawing) as one line: what, and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or ' '.join(str(err).split())}{where}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _describe(error: dict) -> str:
    """One readable line per pydantic error: key, value, expectation."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(error["loc"][:-1])) or "none"
        return f"{key} = {error['input']!r}: unknown key; expected one of: {allowed}"
    value = error.get("input")
    value_text = "" if isinstance(value, dict) else f" = {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}{value_text}: {message}"


def _fields_at(loc: tuple) -> list[str]:
    """The field names a section accepts, found by walking the model classes along ``loc``."""
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))
