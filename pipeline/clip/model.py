"""Sparse CLIP: an open_clip model whose two towers end in a wide linear layer and an activation.

The paper's method in one module (Qin et al., §2): after open_clip's own projection (embed_dim),
each tower gets ``Linear(embed_dim, embed_dim * expansion)`` and a ReLU, and the learnable logit
scale is capped lower than CLIP's ln(100). ``expansion = 0`` is the unmodified dense baseline.
The ablations (Fig 2b) swap the activation (:mod:`.heads`): ``none`` (wide but dense), ``topk``
(k largest, Gao et al.), ``l1`` (ReLU plus an L1 penalty, see :func:`l1_penalty`).

Pooling ``avg`` is the supplementary's Sparse-Avg: every spatial token goes through the
projection, head and activation, and the contrastive embedding is the mean of those per-token
activations, which :meth:`SparseCLIP.encode_image_tokens` keeps for heatmaps.

The towers are open_clip's: a ViT, a ModifiedResNet, a timm model (the pretrained EfficientNet-lite
of :mod:`pipeline.clip.towers`) or a Hugging Face text model, in the model class open_clip's
factory picks (``CustomTextCLIP`` for an HF text tower). A locked tower's output can be computed
once and cached (:mod:`pipeline.clip.feature_cache`); :meth:`SparseCLIP.forward` then reads it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from torch import nn

from pipeline.clip import towers
from pipeline.clip.heads import SparseHead
from pipeline.config import ModelParams


class SparseCLIP(nn.Module):
    """open_clip's CLIP with a sparse head on each tower and a capped logit scale (learnable, as in
    the paper, or fixed)."""

    HEAD_PREFIXES = ("image_head.", "text_head.")  # the wide layers that ``head_lr_multiplier`` reaches

    def __init__(self, clip_cfg: dict[str, Any], params: ModelParams, pretrained: bool = False):
        """``pretrained``: start the towers from their configured weights (the packaged pretrained
        towers, ``params.checkpoint``); False when a saved Sparse CLIP's weights follow. The locks
        apply last, so a saved model and its rebuild share one state-dict layout."""
        super().__init__()
        self.clip_cfg = copy.deepcopy(clip_cfg)
        self.params = params
        self.clip = _open_clip_model(clip_cfg, params.initial_logit_scale, load_text_weights=pretrained)
        self.clip.visual.output_tokens = True  # spatial tokens feed Sparse-Avg and heatmaps
        if pretrained:
            self._load_tower_weights()
        towers.lock_towers(self.clip, params.lock)
        # the leading units of a timm image tower that the lock froze, read once: a caller that later
        # freezes the whole model (the VLM its encoder) must not move where cached rows enter
        self.locked_image_units = (towers.first_trainable_image_unit(self.clip.visual.trunk)
                                   if self.timm_tower and params.lock.image else 0)
        self.cached_inputs = False  # forward() reads raw images and tokens; see read_cached_inputs
        embed_dim = clip_cfg["embed_dim"]
        self.image_head = SparseHead(embed_dim, params)
        self.text_head = SparseHead(embed_dim, params)
        self.width = self.image_head.width
        self.logit_scale_max = math.log(params.logit_scale_cap)
        # A fixed scale is a constant temperature (as in non-negative contrastive learning): the
        # optimiser never sees it, so it stays at its start value.
        self.logit_scale.requires_grad_(params.logit_scale_mode == "learnable")

    def _load_tower_weights(self) -> None:
        image_tower = self.clip_cfg["vision_cfg"].get("pretrained_tower")
        if image_tower:
            towers.load_image_weights(self.clip.visual.trunk, image_tower)
        if self.params.checkpoint:
            path = Path(self.params.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"train.model.checkpoint: no such file: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.clip.load_state_dict(state.get("state_dict", state))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def image_size(self) -> int:
        size = self.clip_cfg["vision_cfg"].get("image_size", 224)
        return size if isinstance(size, int) else size[0]

    @property
    def context_length(self) -> int:
        return self.clip_cfg["text_cfg"].get("context_length", 77)

    @property
    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The pixel normalisation the image tower was trained with (OpenAI CLIP's by default)."""
        vision = self.clip_cfg["vision_cfg"]
        return (tuple(vision.get("image_mean", open_clip.OPENAI_DATASET_MEAN)),
                tuple(vision.get("image_std", open_clip.OPENAI_DATASET_STD)))

    @property
    def text_tokenizer(self) -> str | None:
        """The Hugging Face tokenizer (name or folder) of an HF text tower; None: open_clip's BPE."""
        name = self.clip_cfg["text_cfg"].get("hf_tokenizer_name")
        return towers.resolve_packaged(self.clip_cfg, False)["text_cfg"]["hf_tokenizer_name"] if name else None

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self._encode_image(images, keep_tokens=False)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled sparse embedding [B, F], per-spatial-token sparse activations [B, T, F]).

        With ``cls`` pooling the embedding is the head applied to the CLS token; the per-token
        activations are the same head applied to each spatial token (for comparison heatmaps).
        """
        return self._encode_image(images, keep_tokens=True)

    @property
    def convolutional(self) -> bool:
        """True for a convolutional image tower: open_clip's ModifiedResNet (``vision_cfg.layers`` a
        list of 4 stage depths) or a timm tower (EfficientNet-lite)."""
        return isinstance(self.clip.visual, (ModifiedResNet, TimmModel))

    @property
    def timm_tower(self) -> bool:
        return isinstance(self.clip.visual, TimmModel)

    def _encode_image(self, images: torch.Tensor, keep_tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Per-token activations are [B, T, F]: at ViT-L x72 that is 256 x 55,296 per image, so
        # they are computed only when the pooling needs them or the caller asks (heatmaps).
        want_tokens = keep_tokens or self.params.pooling == "avg"
        if self.timm_tower:
            pooled, tokens = self._timm_head(self.clip.visual.trunk.forward_features(images), want_tokens)
        elif self.convolutional:
            pooled, tokens = self._conv_tower(images, want_tokens)
        else:
            pooled, tokens = self._vit_tower(images)
        return self._pooled_heads(pooled, tokens if want_tokens else None)

    def _pooled_heads(self, pooled: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sparse embedding, per-token activations or None): the head on the pooled embedding, or
        with ``avg`` pooling (Sparse-Avg) the mean of the head applied at every token."""
        token_features = self.image_head(tokens) if tokens is not None else None
        if self.params.pooling == "avg":
            return token_features.mean(dim=1), token_features
        return self.image_head(pooled), token_features

    def _vit_tower(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected CLS token [B, D], projected spatial tokens [B, T, D])."""
        visual = self.clip.visual
        cls_projected, tokens = visual(images)
        return cls_projected, tokens @ visual.proj

    def _conv_tower(self, images: torch.Tensor, want_tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attention-pooled embedding [B, D], one embedding per position of the last feature map
        [B, H x W, D] when asked). A position's embedding is the attention pool's value and output
        projections applied to it alone (MaskCLIP's reading of a CLIP ResNet): the pool's output
        is an attention-weighted mix of exactly these, so they share its space, and the sparse
        head reads them as it reads the pooled embedding."""
        visual = self.clip.visual
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        pooled = visual.attnpool(x)
        if not want_tokens:
            return pooled, None
        pool = visual.attnpool
        positions = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)
        return pooled, pool.c_proj(pool.v_proj(positions))

    def _timm_head(self, feature_map: torch.Tensor, want_tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled embedding [B, D], one embedding per position of the feature map [B, H x W, D]
        when asked) from a timm trunk's last feature map [B, C, H, W]. The pool is an average and
        the projection linear, so the positions' embeddings average exactly to the pooled one."""
        visual = self.clip.visual
        pooled = visual.head(visual.trunk.forward_head(feature_map))
        if not want_tokens:
            return pooled, None
        return pooled, visual.head(feature_map.flatten(2).transpose(1, 2))

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_head(self.clip.encode_text(self._trimmed(texts)))
        return F.normalize(features, dim=-1) if normalize else features

    def _trimmed(self, texts: torch.Tensor) -> torch.Tensor:
        """An HF text tower's batch without the padding columns every row has: the attention mask
        hides padding from every other position and from the mean pool, and positions are absolute,
        so the output is the same (to rounding) at the cost of the longest caption, not of
        ``context_length`` (captions of ~16 tokens padded to 32 cost half). open_clip's own text
        transformer pools at the EOT token of a causal stack and is left as it is."""
        if not self.hf_text_tower or texts.ndim != 2:
            return texts
        used = (texts != self.clip.text.config.pad_token_id).any(dim=0).nonzero()
        return texts[:, : int(used.max()) + 1] if used.numel() else texts

    # ----------------------------------------------------------------- locked towers, cached

    def tower_features(self, images: torch.Tensor | None = None, texts: torch.Tensor | None = None,
                       ) -> dict[str, torch.Tensor]:
        """What the locked part of a tower computes, per input: the timm trunk's pooled last
        feature map [B, C] when it is fully locked, or the input of its first trainable unit
        [B, C, H, W] (:attr:`image_cache_unit`); the HF text model's pooled output [B, W] when it
        is fully locked, or the input of its first trainable layer with the attention mask
        [B, T, W + 1] (:attr:`text_cache_layer`). The feature cache stores these once;
        :meth:`read_cached_inputs` trains from them."""
        out = {}
        if images is not None:
            trunk = self.clip.visual.trunk
            if self.image_cache_unit is not None:
                out["image"] = towers.run_image_units(trunk, images, 0, self.image_cache_unit)
            else:
                out["image"] = trunk.forward_features(images).mean(dim=(2, 3))
        if texts is not None:
            text, texts = self.clip.text, self._trimmed(texts)
            if self.text_cache_layer is not None:
                out["text"] = towers.text_layer_inputs(text, texts, self.text_cache_layer)
            else:
                mask = (texts != text.config.pad_token_id).long()
                out["text"] = text.pooler(text.transformer(input_ids=texts, attention_mask=mask), mask)
        return out

    @property
    def image_cache_unit(self) -> int | None:
        """Where the cached image rows enter a timm image tower locked but for its last groups:
        the index of its first trainable unit (:func:`~pipeline.clip.towers.image_units`); None
        when the rows are the pooled last feature map (fully locked) or nothing is locked."""
        if not self.timm_tower or self.params.lock.image_fully:
            return None
        first = self.locked_image_units
        return first if 0 < first < len(towers.image_units(self.clip.visual.trunk)) else None

    def holds_pixels(self, images: torch.Tensor) -> bool:
        """Whether ``images`` are pixels at this tower's input size, not the feature cache's rows."""
        return images.ndim == 4 and tuple(images.shape[1:]) == (3, self.image_size, self.image_size)

    @property
    def hf_text_tower(self) -> bool:
        return "hf_model_name" in self.clip_cfg["text_cfg"]

    @property
    def text_cache_layer(self) -> int | None:
        """Where the cached text rows enter an HF text tower locked but for its last layers: the
        index of its first trainable layer; None when the rows are the pooled output (fully
        locked) or there is nothing to cache."""
        if not self.hf_text_tower or self.params.lock.text_fully:
            return None
        first = towers.first_trainable_text_layer(self.clip.text, self.params.lock)
        return first if first is not None and first < len(self.clip.text.transformer.encoder.layer) else None

    def cacheable_towers(self) -> list[str]:
        """The towers whose :meth:`tower_features` can stand in for their input: a timm image tower
        with an average pool whose locked units are a fixed function (frozen batch-norm statistics
        included), fully locked (the pooled map: cls pooling only) or but for its last groups (a
        feature map, from which Sparse-Avg's positions follow too); an HF text tower whose locked
        layers are a fixed function (their layer norms frozen too), fully locked or but for its last
        layers."""
        lock, out = self.params.lock, []
        image_rows = ((lock.image_fully and self.params.pooling == "cls") or self.image_cache_unit is not None)
        if (lock.image and lock.image_freeze_bn_stats and self.timm_tower and image_rows
                and self.clip_cfg["vision_cfg"].get("timm_pool") == "avg"):
            out.append("image")
        if (self.hf_text_tower and lock.text_freeze_layer_norm
                and towers.first_trainable_text_layer(self.clip.text, lock) is not None):
            out.append("text")
        return out

    def read_cached_inputs(self, enable: bool = True) -> None:
        """From now on :meth:`forward` takes :meth:`tower_features` instead of images and tokens
        for the cacheable towers: a training step then runs the projections and heads only."""
        if enable and set(self.cacheable_towers()) != {"image", "text"}:
            raise ValueError("cached tower inputs need a locked timm image tower (its batch-norm statistics frozen; "
                             "fully locked, cls pooling only) and a locked HF text tower (train.model.lock, its "
                             "layer norms frozen); cacheable here: "
                             f"{', '.join(self.cacheable_towers()) or 'none'}")
        self.cached_inputs = enable

    def train(self, mode: bool = True) -> SparseCLIP:
        """Locked layers are a fixed function: they stay in eval mode (no dropout) while the rest
        trains, so what the feature cache stored is what they compute in training."""
        super().train(mode)
        if self.locked_image_units:
            for unit in towers.image_units(self.clip.visual.trunk)[: self.locked_image_units]:
                unit.eval()
        if self.hf_text_tower:
            for module in towers.locked_text_modules(self.clip.text, self.params.lock):
                module.eval()
        return self

    def encode_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """The sparse image embedding from :meth:`tower_features`' image rows: the layers that follow
        them in :meth:`encode_image` (the trainable units on a unit's input, then the pool or, for
        Sparse-Avg, the head at every position of the last feature map; an average pool of a 1x1 map
        is the map)."""
        visual = self.clip.visual
        if self.image_cache_unit is None:
            return self.image_head(visual.head(visual.trunk.forward_head(image_features[:, :, None, None])))
        feature_map = towers.run_image_units(visual.trunk, image_features, self.image_cache_unit)
        return self._pooled_heads(*self._timm_head(feature_map, want_tokens=self.params.pooling == "avg"))[0]

    def encode_text_features(self, text_features: torch.Tensor) -> torch.Tensor:
        """The sparse text embedding from :meth:`tower_features`' text rows: the trainable layers
        (when the rows are a layer's input), the projection, the head."""
        if self.text_cache_layer is not None:
            text_features = towers.text_from_layer(self.clip.text, text_features, self.text_cache_layer)
        return self.text_head(self.clip.text.proj(text_features))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unnormalised sparse embeddings (for L0 and L1), normalised ones and exp(logit scale)."""
        if self.cached_inputs:
            image_raw, text_raw = self.encode_image_features(images), self.encode_text_features(texts)
        else:
            image_raw, text_raw = self.encode_image(images), self.encode_text(texts)
        return {
            "image_raw": image_raw,
            "text_raw": text_raw,
            "image_features": F.normalize(image_raw, dim=-1),
            "text_features": F.normalize(text_raw, dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """open_clip clamps to [0, ln 100] after every step; the paper's cap is a parameter."""
        self.logit_scale.clamp_(0, self.logit_scale_max)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    @property
    def vision_layers(self) -> int:
        """Blocks of the vision tower whose output :meth:`residual_tokens` can read: a ViT's
        residual blocks, a ModifiedResNet's four stages, or a timm tower's feature stages."""
        if self.timm_tower:
            return len(self.clip.visual.trunk.feature_info)
        return 4 if self.convolutional else len(self.clip.visual.transformer.resblocks)

    def block_index(self, layer: int) -> int:
        """A block given from the start (0-based) or from the end (-1: the last), as an index
        from the start; a block the tower does not have is an error naming the range."""
        if not -self.vision_layers <= layer < self.vision_layers:
            raise ValueError(f"vision block {layer}: the vision tower has blocks 0..{self.vision_layers - 1} "
                             f"(or -{self.vision_layers}..-1 from the end)")
        return layer % self.vision_layers

    def residual_width(self, layer: int) -> int:
        """The width of :meth:`residual_tokens` after block ``layer``."""
        layer = self.block_index(layer)
        if self.timm_tower:
            return self.clip.visual.trunk.feature_info[layer]["num_chs"]
        if not self.convolutional:
            return self.clip.visual.transformer.width
        stages = (self.clip.visual.layer1, self.clip.visual.layer2, self.clip.visual.layer3, self.clip.visual.layer4)
        return stages[layer][-1].conv3.out_channels

    @torch.no_grad()
    def residual_tokens(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, T, width] tokens of the vision tower after block ``layer`` (0-based): the tokens an
        SAE of the SAE supplementary reads; token 0 is the CLS token, the rest the patches. Only
        blocks 0..layer run; a negative ``layer`` counts from the end. A convolutional tower's "block" is a stage, its tokens the positions
        of that stage's feature map, and its token 0 their mean (what the attention pool queries
        with, the ResNet's counterpart of CLS)."""
        layer = self.block_index(layer)
        visual = self.clip.visual
        if self.convolutional:
            if self.timm_tower:
                x = visual.trunk.forward_intermediates(images, indices=[layer], intermediates_only=True,
                                                       stop_early=True)[0]
            else:
                x = visual.stem(images)
                for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)[: layer + 1]:
                    x = stage(x)
            positions = x.flatten(2).transpose(1, 2)
            return torch.cat([positions.mean(dim=1, keepdim=True), positions], dim=1)
        x = visual._embeds(images)
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[: layer + 1]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)


def l1_penalty(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Mean L1 norm of the L2-normalised embeddings of both towers.

    On normalised vectors the penalty is the L1/L2 ratio, which only falls by concentrating
    mass in fewer dimensions; on raw activations the model could shrink them instead, since
    the contrastive loss only sees their direction.
    """
    return image_features.abs().sum(-1).mean() + text_features.abs().sum(-1).mean()


def clip_config(params: ModelParams) -> dict[str, Any]:
    """The open_clip architecture: a named built-in config or the inline one from params, with the
    pretrained towers of ``params.towers`` in place of its own."""
    if params.arch:
        cfg = open_clip.get_model_config(params.arch)
        if cfg is None:
            raise ValueError(f"train.model.arch = {params.arch!r}: not an open_clip model config; "
                             f"known: {', '.join(open_clip.list_models()[:12])}, ...")
        cfg = {k: copy.deepcopy(v) for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    else:
        cfg = copy.deepcopy(params.inline)
    if params.towers.image:
        cfg["vision_cfg"] = towers.image_tower_config(params.towers.image, params.towers.image_size)
    if params.towers.text:
        cfg["text_cfg"] = towers.text_tower_config(params.towers.text, params.towers.context_length)
    return cfg


def _open_clip_model(cfg: dict[str, Any], init_logit_scale: float, load_text_weights: bool) -> nn.Module:
    """The class open_clip's factory picks for ``cfg``: ``CustomTextCLIP`` for a Hugging Face text
    tower, ``CLIP`` otherwise."""
    resolved = towers.resolve_packaged(cfg, load_text_weights)
    if "hf_model_name" not in resolved["text_cfg"]:
        return open_clip.CLIP(**resolved, init_logit_scale=init_logit_scale)
    with towers.quiet_transformers():
        return open_clip.CustomTextCLIP(**resolved, init_logit_scale=init_logit_scale)


def head_parameters(params: ModelParams) -> int:
    """Parameters of the two wide heads (weights and biases), from the config alone: what
    ``expansion`` costs, known before a model is built."""
    if not params.expansion:
        return 0
    embed_dim = clip_config(params)["embed_dim"]
    width = embed_dim * params.expansion
    return 2 * (embed_dim * width + width)


def build_model(params: ModelParams) -> SparseCLIP:
    """A Sparse CLIP to train: random towers, pretrained ones, or a local checkpoint's, locked as
    configured; the heads always start fresh."""
    return SparseCLIP(clip_config(params), params, pretrained=True)


def save_model(model: SparseCLIP, out_dir: str | Path, name: str = "model.pt") -> Path:
    """Weights as a plain state dict (loadable with ``weights_only=True``) plus a JSON config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_cpu_state(model), out_dir / name)
    config = {"clip_cfg": model.clip_cfg, "model": model.params.model_dump(mode="json")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / name


def load_model(model_dir: str | Path, weights: str = "model.pt") -> SparseCLIP:
    """Rebuild a saved model (any evolution snapshot via ``weights``), in eval mode on CPU."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no trained model in {model_dir} (missing config.json): run the train stage")
    config = json.loads(config_path.read_text())
    model = SparseCLIP(config["clip_cfg"], ModelParams.model_validate(config["model"]))
    weights_path = model_dir / weights if not Path(weights).is_absolute() else Path(weights)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
