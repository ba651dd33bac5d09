"""The concept vocabulary of the synthetic dataset.

Every image is composed only of the concepts named here (shape, colour, size,
position, background texture and an optional rendered word), so each record's
ground truth is a list of "family:value" strings that interpretability metrics
can be scored against. This module is plain data plus two tiny helpers; the
drawing lives in :mod:`pipeline.data.generator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Literal

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart",
)

# Saturated, well separated colours; none is close to the neutral backgrounds.
COLOURS: Mapping[str, RGB] = MappingProxyType({
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
})

# Object side as a fraction of the canvas side: at 64 px these are 14/20/29 px,
# so up to three objects (the largest first) usually fit without overlap.
SIZES: Mapping[str, float] = MappingProxyType({
    "small": 0.22,
    "medium": 0.32,
    "large": 0.45,
})

# Row-major 3x3 grid, indexed by 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "noisy")

# Neutral mid/light greys and beiges for backgrounds: far from every object
# colour (white included) so a texture never reads as a coloured object.
BACKGROUND_TONES: tuple[RGB, ...] = (
    (196, 196, 192),
    (206, 196, 174),
    (178, 174, 166),
    (188, 182, 170),
)

WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "fish", "bird", "tree", "boat")

# Surface forms used in captions; the canonical name is always first.
SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "star shape"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon", "hexagonal shape"),
    "heart": ("heart", "heart shape"),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "lemon"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "tangerine"),
    "white": ("white", "snow white"),
    "black": ("black", "jet black"),
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
    "plain": ("plain", "blank"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered", "checkerboard"),
    "noisy": ("noisy", "grainy"),
})


def position_name(bbox: Sequence[int], image_size: int) -> str:
    """Name the 3x3 grid cell holding the centre of ``bbox`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = bbox
    column = min(int(3 * (x0 + x1) / 2 / image_size), 2)
    row = min(int(3 * (y0 + y1) / 2 / image_size), 2)
    return POSITIONS[3 * row + column]


def concept_words() -> list[str]:
    """All canonical concept words, in a stable order, for vocabulary building."""
    words = (*SHAPES, *COLOURS, *SIZES, *BACKGROUNDS, *WORDS)
    return list(dict.fromkeys(word.lower() for word in words))


def concept_ids(truth: Mapping, objects: Literal["all", "main"] = "all") -> list[str]:
    """The concepts present in a record's ``truth`` as sorted "family:value" ids: those of every
    object, or (``objects="main"``) of the main object only, the one every caption names; the
    background and the rendered word belong to the whole image either way."""
    if objects not in ("all", "main"):
        raise ValueError(f"objects must be 'all' or 'main', got {objects!r}")
    ids = {f"background:{truth['background']}"}
    scope = truth["objects"] if objects == "all" else [truth["objects"][truth["main"]]]
    for obj in scope:
        ids.update((
            f"shape:{obj['shape']}",
            f"colour:{obj['colour']}",
            f"size:{obj['size']}",
            f"position:{obj['position']}",
        ))
    if truth.get("word"):
        ids.add(f"word:{truth['word']['text']}")
    return sorted(ids)
