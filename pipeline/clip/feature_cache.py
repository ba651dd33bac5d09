"""The feature cache: what locked towers compute, encoded once for every stage after them.

A locked pretrained tower is a fixed function, and on 2 cores it is nearly all of a training
step's cost (EfficientNet-lite0 at 224 px, MiniLM on a caption) while the part that trains, the
projections and the sparse heads, costs next to nothing. The ``tower_cache`` stage runs the
towers over every image and caption of the sample once (Ray Data, one actor pool) and stores
:meth:`~pipeline.clip.model.SparseCLIP.tower_features`: the image trunk's pooled last feature map,
or, for an image tower locked but for its last groups, the input of its first trainable unit (a
feature map, stored flat; the manifest's ``image_shape`` gives its [C, H, W]); the text model's
pooled output, or, for a text tower locked but for its last layers, the input of its first
trainable layer (each caption's tokens x hidden width, plus the attention mask as one more
channel; stored flat, the manifest's ``text_channels`` gives the row shape, and read back padded
to the longest caption with mask 0). Training then steps on the cached rows
(:meth:`~pipeline.clip.model.SparseCLIP.read_cached_inputs`), and extraction looks an input up
before it runs a tower: an image by its key, a text by its content (a caption, or a vocabulary
word that happens to be one).

:mod:`pipeline.activations.tower_cache` writes the cache; this module reads it. The cache
belongs to the run's towers and their lock (shared by every variant); with a tower
that trains, there is nothing to cache and the stage records why.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ModelParams

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SETS = ("images", "texts")


class FeatureCache:
    """The cached tower features, read back: images by key, texts by their content."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        manifest = self.out_dir / MANIFEST
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        images = _read(self.out_dir / "images")
        self.image_index = {k: i for i, k in enumerate(images.column("key").to_pylist())}
        self.image_by_group = {g: i for i, g in enumerate(images.column("group").to_pylist())}
        self.images = _matrix(images)
        if shape := self.manifest.get("image_shape"):  # a trainable unit's input, stored flat
            self.images = self.images.reshape(len(self.images), *shape)

    @cached_property
    def _text_table(self) -> tuple[dict[str, int], np.ndarray]:
        """(row of each caption, the rows), read on first use: a reader of images alone (the VLM)
        does not load every caption's features."""
        texts = _read(self.out_dir / "texts")
        channels = self.manifest.get("text_channels")
        index = {t: i for i, t in enumerate(texts.column("text").to_pylist())}
        return index, _padded_sequences(texts, channels) if channels else _matrix(texts)

    @property
    def text_index(self) -> dict[str, int]:
        return self._text_table[0]

    @property
    def texts(self) -> np.ndarray:
        return self._text_table[1]

    @staticmethod
    def available(out_dir: str | Path | None, model_params: ModelParams | None = None) -> bool:
        """Whether ``out_dir`` holds a cache (of ``model_params``' towers and lock, when given)."""
        manifest = Path(out_dir or "") / MANIFEST
        if out_dir is None or not manifest.is_file():
            return False
        record = json.loads(manifest.read_text())
        if not record.get("cached", False):
            return False
        return model_params is None or (record["towers"] == model_params.towers.model_dump(mode="json")
                                        and record["lock"] == model_params.lock.model_dump(mode="json"))

    def pairs(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """``image`` [N, C] and ``text`` [N, W] tower features of records (dicts with ``group`` and
        ``caption``), in their order; a record the cache lacks is an error that names it."""
        try:
            image_rows = [self.image_by_group[str(r["group"])] for r in records]
            text_rows = [self.text_index[r["caption"]] for r in records]
        except KeyError as err:
            raise KeyError(f"feature cache: no entry for {err}: the cache is older than the sample; rerun the "
                           "tower_cache stage") from None
        return {"image": self.images[image_rows], "text": self.texts[text_rows]}

    def lookup_images(self, keys: list[str]) -> np.ndarray | None:
        """The images' features when every key is cached, else None (the caller runs the tower)."""
        rows = [self.image_index.get(k) for k in keys]
        return None if None in rows else self.images[rows]

    def lookup_texts(self, texts: list[str]) -> np.ndarray | None:
        rows = [self.text_index.get(t) for t in texts]
        return None if None in rows else self.texts[rows]


def _read(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"feature cache: no parquet files in {folder} (run the tower_cache stage)")
    return pa.concat_tables([pq.read_table(f) for f in files])


def _matrix(table: pa.Table) -> np.ndarray:
    column = table.column("feature")
    if not len(column):
        return np.zeros((0, 0), np.float32)
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def _padded_sequences(table: pa.Table, channels: int) -> np.ndarray:
    """[N, T, channels] from rows stored flat (each a caption's tokens x channels), zero-padded to
    the longest: a padded position's mask channel is 0, so the layers and the pool ignore it."""
    rows = [np.asarray(row, dtype=np.float32).reshape(-1, channels)
            for row in table.column("feature").to_numpy(zero_copy_only=False)]
    out = np.zeros((len(rows), max((len(r) for r in rows), default=0), channels), np.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def cached_split(cache_dir: str | Path, data_dir: str | Path, split: str, limit: int | None = None,
                 part: tuple[int, int] = (0, 1), one_per_group: bool = False) -> dict[str, np.ndarray]:
    """A split's pairs as cached tower features, in the rows and order that
    :func:`pipeline.data.loading.load_split_arrays` decodes with the same ``limit``, ``part`` (rows
    rank, rank + world, ...) and ``one_per_group`` (each photo's first record), read from the shard
    indexes: no image is decoded."""
    from pipeline.data.shards import index_rows, select_rows

    rows = (row for _, _, row in index_rows(data_dir, [split]))
    return FeatureCache(cache_dir).pairs(select_rows(rows, lambda r: str(r["group"] or r["key"]), part, limit,
                                                     one_per_group))
