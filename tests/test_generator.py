"""Tests for the synthetic concept renderer: determinism, ground truth, captions, crops."""

from __future__ import annotations

import io
import json
import re
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

from pipeline.data.concepts import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    WORDS,
    concept_ids,
    concept_words,
    position_name,
)
from pipeline.data.generator import GeneratedRecord, object_crops, render_record

SEED = 1234
COLOUR_TOLERANCE = 40  # max per-channel error allowed after JPEG at quality 90


@lru_cache(maxsize=None)
def records(count: int = 300) -> tuple[GeneratedRecord, ...]:
    """A shared sample of records (rendering is deterministic, so caching is safe)."""
    return tuple(render_record(i, SEED) for i in range(count))


def decode(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) int16 array (signed, so differences do not wrap)."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.int16)


def mentions(caption: str, name: str) -> bool:
    """Whether any surface form of ``name`` (singular or plural) occurs as whole words."""
    return any(re.search(rf"\b{re.escape(form)}(e?s)?\b", caption) for form in SYNONYMS[name])


def test_same_seed_and_index_give_identical_records():
    first, second = render_record(42, SEED), render_record(42, SEED)
    assert first == second
    assert first.key == "000000042"


def test_different_index_or_seed_gives_different_bytes():
    assert render_record(0, SEED).jpeg != render_record(1, SEED).jpeg
    assert render_record(0, SEED).jpeg != render_record(0, SEED + 1).jpeg


def test_rendering_order_does_not_matter():
    in_order = [render_record(i, SEED) for i in range(10)]
    shuffled = {i: render_record(i, SEED) for i in [*range(5, 10), *range(5)]}
    assert in_order == [shuffled[i] for i in range(10)]


def test_jpeg_decodes_to_square_rgb():
    for size in (64, 96):
        assert decode(render_record(3, SEED, image_size=size).jpeg).shape == (size, size, 3)


def test_truth_is_json_serialisable_and_well_formed():
    for record in records()[:50]:
        truth = json.loads(json.dumps(record.truth))
        assert truth == record.truth
        assert truth["key"] == record.key and truth["index"] == int(record.key)
        assert truth["main"] == 0 and 1 <= len(truth["objects"]) <= 3
        assert truth["background"] in BACKGROUNDS
        for obj in truth["objects"]:
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES
        colours = [obj["colour"] for obj in truth["objects"]]
        assert len(set(colours)) == len(colours)


def test_main_object_is_strictly_largest():
    """The caption names the main object; an image shows which one that is only if no other
    object is as large (a tie would make the main shape and colour a coin toss for any model)."""
    for record in records():
        sides = [SIZES[obj["size"]] for obj in record.truth["objects"]]
        assert all(side < sides[0] for side in sides[1:]), record.truth["objects"]


def test_every_size_and_count_still_drawn():
    mains = {record.truth["objects"][0]["size"] for record in records()}
    counts = {len(record.truth["objects"]) for record in records()}
    others = {obj["size"] for record in records() for obj in record.truth["objects"][1:]}
    assert mains == set(SIZES) and counts == {1, 2, 3} and others == {"small", "medium"}


def boxes_of(truth: dict) -> list[list[int]]:
    word = [truth["word"]["bbox"]] if truth["word"] else []
    return [obj["bbox"] for obj in truth["objects"]] + word


def test_boxes_inside_image_and_disjoint():
    for record in records():
        size = record.truth["image_size"]
        boxes = boxes_of(record.truth)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                disjoint = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                assert disjoint, (record.key, a, b)


def test_object_colour_at_box_centre():
    for record in records()[:150]:
        pixels = decode(record.jpeg)
        for obj in record.truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3)
            error = np.abs(np.median(patch, axis=0) - COLOURS[obj["colour"]]).max()
            assert error <= COLOUR_TOLERANCE, (record.key, obj, error)


def test_background_never_looks_like_an_object_colour():
    palette = np.array(list(COLOURS.values()), dtype=np.int16)
    for record in records()[:150]:
        pixels = decode(record.jpeg)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in boxes_of(record.truth):
            outside[y0:y1, x0:x1] = False
        rest = pixels[outside]
        distance = np.abs(rest[:, None, :] - palette[None, :, :]).max(axis=2).min(axis=1)
        assert (distance <= COLOUR_TOLERANCE).mean() < 0.02, record.key


def test_position_matches_box_centre():
    for record in records():
        for obj in record.truth["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            row, column = POSITIONS.index(obj["position"]) // 3, POSITIONS.index(obj["position"]) % 3
            third = record.truth["image_size"] / 3
            assert column * third <= (x0 + x1) / 2 <= (column + 1) * third
            assert row * third <= (y0 + y1) / 2 <= (row + 1) * third


def test_position_name_grid():
    assert position_name([0, 0, 10, 10], 64) == "top left"
    assert position_name([27, 27, 37, 37], 64) == "center"
    assert position_name([54, 54, 64, 64], 64) == "bottom right"
    assert position_name([27, 54, 37, 64], 64) == "bottom"


def test_concepts_match_truth():
    for record in records():
        truth = record.truth
        expected = {f"background:{truth['background']}"}
        for obj in truth["objects"]:
            expected |= {f"shape:{obj['shape']}", f"colour:{obj['colour']}",
                         f"size:{obj['size']}", f"position:{obj['position']}"}
        if truth["word"]:
            assert truth["word"]["text"] in WORDS
            expected.add(f"word:{truth['word']['text']}")
        assert truth["concepts"] == sorted(expected) == concept_ids(truth)


def test_caption_names_main_object_and_nothing_absent():
    for record in records():
        caption, truth = record.caption, record.truth
        assert caption.strip()
        main = truth["objects"][0]
        assert mentions(caption, main["colour"]) and mentions(caption, main["shape"]), caption
        present = {obj[family] for obj in truth["objects"] for family in ("shape", "colour", "size")}
        present.add(truth["background"])
        for name in [*SHAPES, *COLOURS, *SIZES, *BACKGROUNDS]:
            if name not in present:
                assert not mentions(caption, name), (caption, name)
        for text in WORDS:
            if re.search(rf"\b{text}\b", caption):
                assert truth["word"] and truth["word"]["text"] == text, caption


def test_caption_usually_states_present_word():
    with_word = [r for r in records() if r.truth["word"]]
    stated = [r for r in with_word if r.truth["word"]["text"] in r.caption]
    assert with_word and len(stated) >= 0.6 * len(with_word)


def test_caption_variety():
    captions = [record.caption for record in records()]
    assert len(set(captions)) > 0.9 * len(captions)
    assert any(re.search(r"\b(two|three)\b", caption) for caption in captions)


def test_object_crops():
    for record in records()[:30]:
        crops = object_crops(record, pad=2)
        assert len(crops) == len(record.truth["objects"])
        size = record.truth["image_size"]
        image = decode(record.jpeg).astype(int)
        for (obj, jpeg), expected in zip(crops, record.truth["objects"]):
            assert obj == expected
            crop = decode(jpeg).astype(int)
            assert crop.shape == (size, size, 3)  # the object at its own scale and place
            x0, y0, x1, y1 = obj["bbox"]
            inside = np.zeros((size, size), bool)
            inside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True
            assert np.abs(crop[inside] - image[inside]).mean() < 6  # the box as in the image (JPEG noise)
            outside = crop[~inside]
            assert np.abs(outside - np.median(outside, axis=0)).mean() < 6  # one flat colour elsewhere


def test_concept_words_are_canonical_and_unique():
    words = concept_words()
    assert len(words) == len(set(words))
    assert all(word == word.lower() for word in words)
    assert {*SHAPES, *COLOURS, *SIZES, *BACKGROUNDS, *WORDS} == set(words)


def test_every_concept_has_two_surface_forms():
    for name in [*SHAPES, *COLOURS, *SIZES, *BACKGROUNDS]:
        assert len(SYNONYMS[name]) >= 2 and SYNONYMS[name][0] == name


@pytest.mark.parametrize("kwargs", [{"image_size": 16}, {"max_objects": 0}, {"word_probability": 1.5},
                                    {"position_probability": -0.1}])
def test_invalid_arguments_rejected(kwargs):
    with pytest.raises(ValueError):
        render_record(0, SEED, **kwargs)


def test_position_probability_names_the_main_objects_place_and_changes_nothing_else():
    """1: every caption names the main object's grid cell; 0: none does; the image, the truth and
    the default's captions are the same draws whatever the probability."""
    from pipeline.data.generator import _POSITION_PHRASES

    for index in range(40):
        default, always, never = (render_record(index, SEED, position_probability=p) for p in (0.5, 1.0, 0.0))
        place = default.truth["objects"][0]["position"]
        assert always.jpeg == never.jpeg == default.jpeg and always.truth == default.truth
        assert any(phrase in always.caption for phrase in _POSITION_PHRASES[place])
        assert not any(phrase in never.caption for phrases in _POSITION_PHRASES.values() for phrase in phrases)
        assert default.caption in (always.caption, never.caption)
