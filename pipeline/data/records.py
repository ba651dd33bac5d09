"""Image-caption records and their validation.

A source yields :class:`RawRecord` s exactly as it found them (any part may be missing); the
sample stage turns each into a clean :class:`Record` or a :class:`Skip` that says why, so one
corrupt JPEG or empty caption among millions is counted and listed rather than fatal.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs well above any training image


class SkipReason(StrEnum):
    IMAGE_MISSING = "image_missing"
    IMAGE_CORRUPT = "image_corrupt"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_BAD_ASPECT = "image_bad_aspect"
    CAPTION_MISSING = "caption_missing"
    CAPTION_EMPTY = "caption_empty"
    SIDECAR_MISSING = "sidecar_missing"
    SIDECAR_CORRUPT = "sidecar_corrupt"


@dataclass(frozen=True)
class RawRecord:
    """One pair as a source holds it. ``group`` ties records of one image (e.g. 5 captions)."""

    key: str
    group: str
    image: bytes | None
    caption: str | None
    sidecar: dict[str, Any] | None = None
    sidecar_error: str | None = None
    origin: str = ""


@dataclass(frozen=True)
class Record:
    """A validated pair, ready to be written: JPEG bytes, non-empty caption, metadata."""

    key: str
    jpeg: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    key: str
    reason: SkipReason
    detail: str
    origin: str


# What Pillow raises on bytes that are not a whole, sane image: every reader of user images
# catches exactly these (a corrupt file is counted and skipped, never a traceback).
IMAGE_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def validate(raw: RawRecord, *, min_side: int, max_aspect: float, require_sidecar: bool) -> Record | Skip:
    """Check that the image decodes and is sane, the caption is present, the sidecar readable."""

    def skip(reason: SkipReason, detail: str) -> Skip:
        return Skip(raw.key, reason, detail, raw.origin)

    if raw.image is None:
        return skip(SkipReason.IMAGE_MISSING, "no image bytes")
    try:
        with Image.open(io.BytesIO(raw.image)) as image:
            image.load()
            width, height = image.size
            image_format = image.format
            rgb = image.convert("RGB") if image_format != "JPEG" else None
    except IMAGE_DECODE_ERRORS as err:
        return skip(SkipReason.IMAGE_CORRUPT, f"{type(err).__name__}: {err}")
    if min(width, height) < min_side:
        return skip(SkipReason.IMAGE_TOO_SMALL, f"{width}x{height} < {min_side} px")
    if max(width, height) / min(width, height) > max_aspect:
        return skip(SkipReason.IMAGE_BAD_ASPECT, f"{width}x{height} exceeds aspect {max_aspect:g}")
    if raw.caption is None:
        return skip(SkipReason.CAPTION_MISSING, "no caption")
    caption = " ".join(raw.caption.split())
    if not caption:
        return skip(SkipReason.CAPTION_EMPTY, "caption is blank")
    if raw.sidecar_error is not None:
        return skip(SkipReason.SIDECAR_CORRUPT, raw.sidecar_error)
    if require_sidecar and raw.sidecar is None:
        return skip(SkipReason.SIDECAR_MISSING, "no .json sidecar")
    jpeg = raw.image if rgb is None else _to_jpeg(rgb)
    meta = {**(raw.sidecar or {}), "key": raw.key, "group": raw.group, "width": width, "height": height}
    return Record(raw.key, jpeg, caption, meta)


def _to_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
