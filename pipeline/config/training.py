"""Parameters of training: the model (towers, heads, caps), its variants, the optimiser and the
worker group that trains it."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    Field,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.config.base import OutputDir, Section

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
    text_unlocked_layers: int = Field(0, ge=0, description="last layers of the text tower left trainable, "
                                      "counted as open_clip counts them (the embeddings are one more layer); the "
                                      "feature cache then holds the input of the first trainable layer")
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
    feature_cache: bool = Field(True, description="when the image tower is locked (all of it, or all but its last "
                                "groups) and the text tower locked (all of it, or all but its last layers), train "
                                "from their locked layers' outputs, encoded once by the tower_cache stage "
                                "(pipeline/clip/feature_cache.py)")
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

    @property
    def feature_cache_in_use(self) -> str | None:
        """The tower cache's folder for the stages that read it (extraction, the VLM), None when
        ``feature_cache`` is off; each reader still checks that the cache holds its model's towers."""
        return self.feature_cache_dir if self.feature_cache else None

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


