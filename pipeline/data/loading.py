"""Turning sampled shards into model inputs, the same way for training, evaluation and extraction.

:class:`ClipBatchPreprocessor` is a Ray Data ``map_batches`` callable (one instance per actor,
so the tokenizer loads once) and also a plain function on a batch dict, so the driver, a Ray
Train worker and a Ray Data actor all decode and tokenise identically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from pipeline.data.shards import read_split, select_rows, split_paths


class ClipBatchPreprocessor:
    """webdataset columns (``jpg``, ``txt`` bytes) -> ``image`` float32 [N,3,H,W], ``text`` int64 [N,L].

    ``image_dtype=np.float16`` halves the bytes a Ray Data pipeline moves through the object store
    (the embedded train split: 530 -> 265 MB, a third of its decoding time); the consumer casts
    back to float32. Normalised 8-bit pixels lose nothing that matters in float16 (its spacing,
    at most 0.002 in [-2, 2.2], is a seventh of one pixel step).

    Images already at the model's square input size (the embedded data) skip torchvision: resize
    and crop are then no-ops, and the same float32 arithmetic in numpy gives the same bits at a
    quarter of the cost (5.5 -> 1.4 s for the 10,800 training images)."""

    def __init__(self, image_size: int, context_length: int, image_dtype: type = np.float32,
                 mean: tuple[float, ...] = OPENAI_DATASET_MEAN, std: tuple[float, ...] = OPENAI_DATASET_STD,
                 tokenizer: str | None = None):
        self.transform = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
        self.tokenizer = _tokenizer(tokenizer, context_length)
        self.image_dtype = image_dtype
        self.size = (image_size, image_size)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def for_model(cls, model, image_dtype: type = np.float32) -> ClipBatchPreprocessor:
        """The inputs ``model`` (a :class:`~pipeline.clip.model.SparseCLIP`) was built for: its
        input size, pixel normalisation and tokenizer."""
        mean, std = model.image_mean_std
        return cls(model.image_size, model.context_length, image_dtype, mean, std, model.text_tokenizer)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        # each image is written into its row of one array: stacking a list and then casting it
        # copied every pixel twice more (8 of the 17 s that the embedded train split took)
        images = np.empty((len(batch["jpg"]), 3, *self.size), dtype=self.image_dtype)
        for row, jpeg in zip(images, batch["jpg"]):
            row[...] = self.image(jpeg)
        return {"image": images, "text": self.tokens([_text(t) for t in batch["txt"]])}

    def image(self, jpeg: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(jpeg)) as image:
            rgb = image.convert("RGB")
        if rgb.size != self.size:
            return self.transform(rgb).numpy()
        pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255)  # ToTensor, then Normalize
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(list(texts)).numpy().astype(np.int64)


def ray_split_dataset(data_dir: str | Path, split: str, preprocessor: ClipBatchPreprocessor, task_cpus: float):
    """A Ray Dataset of one split, decoded and tokenised by CPU tasks."""
    import ray.data

    return ray.data.read_webdataset(split_paths(data_dir, split), decoder=None, num_cpus=task_cpus).map_batches(
        preprocessor, batch_size=64, num_cpus=task_cpus
    )


def load_split_arrays(data_dir: str | Path, split: str, preprocessor: ClipBatchPreprocessor,
                      limit: int | None = None, part: tuple[int, int] = (0, 1), decode: bool = True,
                      one_per_group: bool = False) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """A split decoded in this process (evaluation sets, or a training split small enough to keep
    in memory): arrays plus each record's meta. ``part=(rank, world)`` keeps rows rank, rank +
    world, ... of the split in shard order, so ``world`` workers get disjoint, equal (within one)
    slices that do not depend on any scheduling. ``decode`` False returns no arrays (the metas
    alone, for inputs read from elsewhere); ``one_per_group`` keeps each photo's first record
    only (a photo with five captions is decoded once, and ``limit`` counts photos)."""
    records = select_rows(read_split(data_dir, split), lambda r: str(r.meta.get("group", r.key)), part, limit,
                          one_per_group)
    if not decode:
        return {}, [r.meta for r in records]
    arrays = preprocessor({"jpg": [r.jpeg for r in records], "txt": [r.caption for r in records]})
    return arrays, [r.meta for r in records]


def _tokenizer(name: str | None, context_length: int):
    """open_clip's BPE tokenizer, or the Hugging Face tokenizer of an HF text tower."""
    if name is None:
        return SimpleTokenizer(context_length=context_length)
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(name, context_length=context_length)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
