"""Parameters of the ``sample`` stage: where pairs come from and how they are split."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.config.base import OutputDir, Section

# --------------------------------------------------------------------------- sample stage


class GeneratorParams(Section):
    """The embedded concept dataset (:mod:`pipeline.data.generator`)."""

    num_records: int = Field(4000, ge=1)
    image_size: int = Field(64, ge=32, le=1024)
    max_objects: int = Field(3, ge=1, le=6)
    word_probability: float = Field(0.35, ge=0.0, le=1.0)
    position_probability: float = Field(0.5, ge=0.0, le=1.0,
                                        description="share of captions that name the main object's place")
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


