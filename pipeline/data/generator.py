"""Deterministic renderer for the synthetic concept dataset.

Why this dataset exists: in natural image-text data nobody knows which concepts
an image really contains or where they are, so claims about what a sparse CLIP
feature "means" cannot be checked. Here every image is drawn from a small known
vocabulary (shapes, colours, sizes, positions, background textures, rendered
words) and the renderer records each object's tight bounding box. That makes
interpretability measurable: concept recovery (does some feature fire exactly
for "colour:red"?) and the pointing game (does a feature's saliency fall inside
the right box?).

Every record is a pure function of ``(seed, index)``: all randomness comes from
``numpy.random.default_rng([seed, index])``, so records can be produced alone,
in any order, on any worker, and always yield the same JPEG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.concepts import (
    BACKGROUND_TONES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    SYNONYMS,
    WORDS,
    concept_ids,
    position_name,
)

_EDGE_MARGIN = 1  # px kept free along the canvas border
_GAP = 2  # px between any two placed items, so JPEG bleed stays out of other boxes
_PLACEMENT_TRIES = 40
_WORD_PAD = 2  # px of plain box around the rendered word
# (box, text) colour pairs: dark-on-light or light-on-dark, both legible at 64 px.
_WORD_STYLES = (((236, 232, 220), (30, 30, 30)), ((52, 52, 60), (240, 240, 240)))
_TONE_STEP = 30  # how much darker the second tone of a texture is
_NOISE_SIGMA = 8.0

_COLOUR_NAMES = tuple(COLOURS)
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_TEMPLATES = (
    "{main}{rest}",
    "a picture of {main}{rest}",
    "an image showing {main}{rest}",
    "a drawing of {main}{rest}",
    "there is {main}{rest}",
    "a rendering of {main}{rest}",
    "a simple scene with {main}{rest}",
    "a synthetic image of {main}{rest}",
)
_POSITION_PHRASES = {
    "top left": ("in the top left", "in the top left corner"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right", "in the top right corner"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
_BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "over a {} backdrop")
_WORD_PHRASES = (
    'with the word "{}"',
    "next to a sign that says {}",
    'and a label reading "{}"',
    'with "{}" written nearby',
    'and the text "{}"',
)


def _unit_star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    """Star polygon in the unit square; a fat inner radius keeps its centre solid."""
    vertices = []
    for i in range(2 * points):
        radius = 0.5 if i % 2 == 0 else 0.5 * inner
        angle = -math.pi / 2 + i * math.pi / points
        vertices.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
    return tuple(vertices)


def _unit_heart(samples: int = 32) -> tuple[tuple[float, float], ...]:
    """Classic parametric heart curve, rescaled to fill the unit square."""
    ts = np.linspace(0.0, 2 * np.pi, samples, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    xs = (xs - xs.min()) / (xs.max() - xs.min())
    ys = (ys - ys.min()) / (ys.max() - ys.min())
    return tuple(zip(xs.tolist(), ys.tolist()))


_A, _B = 1 / 3, 2 / 3
# Polygon outlines in unit-square coordinates; circle and square use PIL primitives.
_UNIT_POLYGONS = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "star": _unit_star(),
    "cross": ((_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B),
              (_B, 1), (_A, 1), (_A, _B), (0, _B), (0, _A), (_A, _A)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "hexagon": tuple((0.5 + 0.5 * math.cos(k * math.pi / 3), 0.5 + 0.5 * math.sin(k * math.pi / 3))
                     for k in range(6)),
    "heart": _unit_heart(),
}


@dataclass(frozen=True)
class GeneratedRecord:
    """One rendered example: JPEG image, caption and its JSON-serialisable ground truth."""

    key: str
    jpeg: bytes
    caption: str
    truth: dict


def render_record(
    index: int,
    seed: int,
    image_size: int = 64,
    max_objects: int = 3,
    word_probability: float = 0.35,
    jpeg_quality: int = 90,
    position_probability: float = 0.5,
) -> GeneratedRecord:
    """Render record ``index`` of the dataset identified by ``seed``.

    The result depends only on the arguments, so any worker can make any record.
    """
    if image_size < 32 or max_objects < 1 or not 0.0 <= word_probability <= 1.0 \
            or not 0.0 <= position_probability <= 1.0:
        raise ValueError("need image_size >= 32, max_objects >= 1, 0 <= word_probability <= 1, "
                         "0 <= position_probability <= 1")
    rng = np.random.default_rng([seed, index])
    background = _pick(rng, BACKGROUNDS)
    image = Image.fromarray(_background(rng, background, image_size))
    draw = ImageDraw.Draw(image)

    cells = _place_objects(rng, image_size, max_objects)
    colours = rng.choice(len(COLOURS), size=len(cells), replace=False)
    objects = []
    for (x, y, side, size), colour_index in zip(cells, colours):
        colour = _COLOUR_NAMES[int(colour_index)]
        shape = _pick(rng, SHAPES)
        bbox = _draw_shape(image, shape, x, y, side, COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "size": size,
                        "position": position_name(bbox, image_size), "bbox": bbox})

    word = None
    if rng.random() < word_probability:
        word = _draw_word(rng, draw, _pick(rng, WORDS), cells, image_size)

    key = f"{index:09d}"
    truth = {"key": key, "seed": int(seed), "index": int(index), "image_size": image_size,
             "main": 0, "objects": objects, "background": background, "word": word}
    truth["concepts"] = concept_ids(truth)
    caption = scene_caption(rng, objects, background, word, position_probability)
    return GeneratedRecord(key=key, jpeg=_encode_jpeg(image, jpeg_quality), caption=caption, truth=truth)


def object_crops(record: GeneratedRecord, pad: int = 2, jpeg_quality: int = 90) -> list[tuple[dict, bytes]]:
    """Per object, its truth dict and a JPEG of its padded box (for box classification), kept at
    its own scale and place in a canvas of the image's size, everything outside the box painted
    the mean colour of the box's border. A box cut out and resized to the model's input would show
    a 14-px object as a 64-px blob, a scale no training image has; this way the box is classified
    as the one object of an otherwise empty scene."""
    pixels = np.asarray(Image.open(io.BytesIO(record.jpeg)).convert("RGB"))
    height, width, _ = pixels.shape
    crops = []
    for obj in record.truth["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        left, top, right, bottom = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, width), min(y1 + pad, height)
        box = pixels[top:bottom, left:right]
        border = np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])
        canvas = np.empty_like(pixels)
        canvas[:] = border.mean(axis=0).round().astype(np.uint8)
        canvas[top:bottom, left:right] = box
        crops.append((obj, _encode_jpeg(Image.fromarray(canvas), jpeg_quality)))
    return crops


def _pick(rng: np.random.Generator, options):
    """Uniform choice that returns the element itself (a plain str, not a numpy scalar)."""
    return options[int(rng.integers(len(options)))]


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Byte-stable JPEG: no metadata, no optimiser; 4:4:4 so small shapes keep their colour."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, subsampling=0)
    return buffer.getvalue()


def _background(rng: np.random.Generator, texture: str, image_size: int) -> np.ndarray:
    """Neutral two-tone texture as an (H, W, 3) uint8 array."""
    base = np.array(_pick(rng, BACKGROUND_TONES), dtype=np.int16)
    dark = base - _TONE_STEP
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    period = int(rng.integers(4, 9))
    if texture == "striped":
        along = (xx, yy, xx + yy, xx - yy)[int(rng.integers(4))]
        mask = (along // (period // 2)) % 2 == 1
    elif texture == "dotted":
        mask = (xx % period < 2) & (yy % period < 2)
    elif texture == "checkered":
        mask = ((xx // period) + (yy // period)) % 2 == 1
    else:
        mask = np.zeros((image_size, image_size), dtype=bool)
    pixels = np.where(mask[..., None], dark, base)
    if texture == "noisy":
        pixels = pixels + rng.normal(0.0, _NOISE_SIGMA, size=(image_size, image_size, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two (x, y, w, h) rectangles come closer than ``_GAP`` pixels."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw + _GAP and bx < ax + aw + _GAP and ay < by + bh + _GAP and by < ay + ah + _GAP


def _free_spot(rng: np.random.Generator, width: int, height: int, image_size: int,
               taken: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """Rejection-sample a top-left corner for a width x height box clear of ``taken``."""
    high_x = image_size - _EDGE_MARGIN - width
    high_y = image_size - _EDGE_MARGIN - height
    if high_x < _EDGE_MARGIN or high_y < _EDGE_MARGIN:
        return None
    for _ in range(_PLACEMENT_TRIES):
        x = int(rng.integers(_EDGE_MARGIN, high_x + 1))
        y = int(rng.integers(_EDGE_MARGIN, high_y + 1))
        if not any(_overlaps((x, y, width, height), box) for box in taken):
            return x, y
    return None


def _place_objects(rng: np.random.Generator, image_size: int,
                   max_objects: int) -> list[tuple[int, int, int, str]]:
    """Choose (x, y, side, size name) cells, the main object first; drop any that do not fit.

    The main object (the one every caption names) is strictly the largest, so an image alone says
    which object its caption describes: with sizes drawn independently, 16% of images had a second
    object as large as the main one, and no model could tell which of the two the caption meant.
    With company, the main object is medium or large and the others are drawn from the smaller sizes."""
    count = int(rng.integers(1, max_objects + 1))
    names = sorted(SIZES, key=lambda n: SIZES[n])
    main = _pick(rng, names if count == 1 else names[1:])
    smaller = names[: names.index(main)]
    chosen = [main, *sorted((_pick(rng, smaller) for _ in range(count - 1)), key=lambda n: -SIZES[n])]
    cells: list[tuple[int, int, int, str]] = []
    for size in chosen:
        side = max(6, round(SIZES[size] * image_size))
        spot = _free_spot(rng, side, side, image_size, [(x, y, s, s) for x, y, s, _ in cells])
        if spot is not None:
            cells.append((*spot, side, size))
    return cells


def _draw_shape(image: Image.Image, shape: str, x: int, y: int, side: int,
                rgb: tuple[int, int, int]) -> list[int]:
    """Draw ``shape`` into its cell and return the tight bbox of the drawn pixels."""
    mask = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(mask)
    last = side - 1
    if shape == "circle":
        pen.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        pen.rectangle((0, 0, last, last), fill=255)
    else:
        pen.polygon([(u * last, v * last) for u, v in _UNIT_POLYGONS[shape]], fill=255)
    image.paste(rgb, (x, y, x + side, y + side), mask)
    left, top, right, bottom = mask.getbbox()
    return [x + left, y + top, x + right, y + bottom]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font; cached because loading it costs more than a render."""
    return ImageFont.load_default(size=size)


def _draw_word(rng: np.random.Generator, draw: ImageDraw.ImageDraw, text: str,
               cells: list[tuple[int, int, int, str]], image_size: int) -> dict | None:
    """Draw ``text`` on a small plain box clear of all objects; None if it does not fit."""
    font = _font(max(8, round(0.17 * image_size)))
    left, top, right, bottom = font.getbbox(text)
    width = right - left + 2 * _WORD_PAD
    height = bottom - top + 2 * _WORD_PAD
    box_rgb, text_rgb = _WORD_STYLES[int(rng.integers(len(_WORD_STYLES)))]
    spot = _free_spot(rng, width, height, image_size, [(x, y, s, s) for x, y, s, _ in cells])
    if spot is None:
        return None
    x, y = spot
    draw.rectangle((x, y, x + width - 1, y + height - 1), fill=box_rgb)
    draw.text((x + _WORD_PAD - left, y + _WORD_PAD - top), text, font=font, fill=text_rgb)
    return {"text": text, "bbox": [x, y, x + width, y + height]}


def _with_article(phrase: str) -> str:
    """Prefix "a" or "an" by the first letter of ``phrase``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun: str) -> str:
    """Plural of a (possibly multi-word) shape form: "box" -> "boxes", "plus sign" -> "plus signs"."""
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _join(items: list[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_word(n: int) -> str:
    """Spelled-out count ("two"), so captions read naturally; digits beyond ten."""
    return _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)


def _object_phrase(rng: np.random.Generator, obj: dict, size_probability: float) -> str:
    """E.g. "a big crimson disc": always colour and shape, size with the given probability."""
    words = [_pick(rng, SYNONYMS[obj["colour"]]), _pick(rng, SYNONYMS[obj["shape"]])]
    if rng.random() < size_probability:
        words.insert(0, _pick(rng, SYNONYMS[obj["size"]]))
    return _with_article(" ".join(words))


def _others_phrase(rng: np.random.Generator, others: list[dict], total: int) -> str:
    """Mention the non-main objects: listed, grouped by shape with a count, or only counted."""
    style = int(rng.integers(4))
    if style == 0:
        return f"and {count_word(len(others))} other shape" + ("s" if len(others) > 1 else "")
    if style == 1:
        return f"one of {count_word(total)} shapes"
    groups: dict[str, list[dict]] = {}
    for obj in others:
        groups.setdefault(obj["shape"], []).append(obj)
    items = []
    for shape, members in groups.items():
        if len(members) == 1:
            items.append(_object_phrase(rng, members[0], size_probability=0.3))
        else:
            items.append(f"{count_word(len(members))} {_plural(_pick(rng, SYNONYMS[shape]))}")
    return ("next to " if style == 2 else "with ") + _join(items)


def scene_caption(rng: np.random.Generator, objects: list[dict], background: str, word: dict | None,
                  position_probability: float = 0.5) -> str:
    """Varied caption that names the main object's colour and shape and nothing absent; its grid
    position with ``position_probability`` (the same random draws whatever the probability)."""
    main = _object_phrase(rng, objects[0], size_probability=0.6)
    if rng.random() < position_probability:
        main += " " + _pick(rng, _POSITION_PHRASES[objects[0]["position"]])
    extras = []
    if len(objects) > 1 and rng.random() < 0.6:
        extras.append(_others_phrase(rng, objects[1:], len(objects)))
    if rng.random() < 0.3:
        extras.append(_pick(rng, _BACKGROUND_PHRASES).format(_pick(rng, SYNONYMS[background])))
    if word is not None and rng.random() < 0.85:
        extras.append(_pick(rng, _WORD_PHRASES).format(word["text"]))
    rest = "".join(", " + extra for extra in extras)
    return _pick(rng, _TEMPLATES).format(main=main, rest=rest)
