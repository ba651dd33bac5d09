"""Concept naming, feature evolution, heatmaps + pointing game, and the HTML atlas in Chromium."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from pipeline.activations.tokens import token_centres
from pipeline.atlas.build import build_atlas, naming_agreement
from pipeline.atlas.evolution import evolution_summary, evolution_table
from pipeline.atlas.localisation import pointing_game, pointing_trials
from pipeline.atlas.naming import features_for_word, name_features, top_per_feature
from pipeline.config import load_params
from pipeline.data.concepts import COLOURS
from pipeline.data.generator import render_record

from .browser import Browser
from .conftest import REPO

RECORDS = [render_record(i, seed=3) for i in range(60)]
TRUTHS = {r.key: r.truth for r in RECORDS}


def test_top_per_feature_matches_brute_force():
    rng = np.random.default_rng(0)
    dense = np.maximum(rng.normal(size=(40, 12)), 0) * (rng.random((40, 12)) < 0.3)
    rows, values = top_per_feature(sp.csr_matrix(dense), k=5)
    for f in range(12):
        expected = [r for r in np.argsort(-dense[:, f], kind="stable") if dense[r, f] > 0][:5]
        assert list(rows[f][rows[f] >= 0]) == expected
        np.testing.assert_allclose(values[f][: len(expected)], dense[expected, f])
    top, _ = features_for_word(sp.csr_matrix(dense), k=2)
    assert [list(t[t >= 0]) for t in top] == [[f for f in np.argsort(-row) if row[f] > 0][:2] for row in dense]


def planted_colour_model(noise: float = 0.3):
    """Feature i fires on images holding colour i and on the word for it; distractor words and
    a noise feature fire at random: what a model that learned colour looks like."""
    rng = np.random.default_rng(1)
    colours = list(COLOURS)
    width = len(colours) + 1
    images = np.zeros((len(RECORDS), width))
    for r, record in enumerate(RECORDS):
        for obj in record.truth["objects"]:
            images[r, colours.index(obj["colour"])] = 1 + rng.random()
    images[:, -1] = rng.random(len(RECORDS))
    words = colours + ["apple", "house", "river", "music", "table"]
    vocab = rng.random((len(words), width)) * noise
    vocab[np.arange(len(colours)), np.arange(len(colours))] = 1.0
    return words, sp.csr_matrix(vocab), sp.csr_matrix(images)


def test_planted_colour_features_are_named_by_their_word():
    words, vocab, images = planted_colour_model()
    named = name_features(words, vocab, [r.key for r in RECORDS], images, k_words=3, k_images=5)
    assert named.column("name").to_pylist()[: len(COLOURS)] == list(COLOURS)
    agreement = naming_agreement(named, TRUTHS)
    assert agreement["colour.in_top_words"] == 1.0
    for colour in COLOURS:  # a feature whose top images hold red objects has "red" among its top words
        row = agreement["concepts"][f"colour:{colour}"]
        assert row["precision"] == 1.0 and row["name"] == colour
    shuffled = name_features(words, vocab[np.random.default_rng(2).permutation(len(words))], [r.key for r in RECORDS],
                             images, k_words=1, k_images=5)
    assert naming_agreement(shuffled, TRUTHS)["colour.in_top_words"] < 0.5  # the check can fail


def test_evolution_table_has_a_row_per_feature_per_snapshot():
    words, vocab, images = planted_colour_model()
    keys = [r.key for r in RECORDS]
    early = name_features(words, vocab[::-1].tocsr(), keys, images, 2, 3)  # names permuted early on
    final = name_features(words, vocab, keys, images, 2, 3)
    modality = np.linspace(0, 1, images.shape[1])
    table = evolution_table([("1pct", early, modality), ("50pct", final, modality), ("100pct", final, modality)])
    assert table.num_rows == 3 * images.shape[1]
    rows = table.to_pylist()
    assert {r["checkpoint"] for r in rows} == {"1pct", "50pct", "100pct"}
    renamed = [r["renamed"] for r in rows if r["checkpoint"] == "50pct"]
    expected = [a != b for a, b in zip(early.column("name").to_pylist(), final.column("name").to_pylist())]
    assert renamed == expected and any(expected)
    summary = evolution_summary(table)
    assert summary["100pct"]["final_name_share"] == 1.0 and summary["100pct"]["words_vs_final"] == 1.0
    assert summary["1pct"]["final_name_share"] == pytest.approx(1 - np.mean(expected))


def _grids(hot_inside: bool, side: int = 8):
    """Token grids where each colour's feature peaks on one token inside (or outside) its boxes."""
    colours = list(COLOURS)
    grids = {}
    for record in RECORDS[:20]:
        size = record.truth["image_size"]
        centres = token_centres(side, size, size)
        heat = np.zeros((side * side, len(colours)))
        for colour in {o["colour"] for o in record.truth["objects"]}:
            boxes = [o["bbox"] for o in record.truth["objects"] if o["colour"] == colour]
            inside = np.zeros(side * side, dtype=bool)
            for x0, y0, x1, y1 in boxes:
                inside |= (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
            candidates = np.flatnonzero(inside if hot_inside else ~inside)
            heat[:, colours.index(colour)] = 0.1
            heat[candidates[len(candidates) // 2], colours.index(colour)] = 2.0
        grids[record.key] = sp.csr_matrix(heat)
    return grids, {c: i for i, c in enumerate(colours)}


def test_pointing_game_scores_the_hottest_token_against_real_boxes():
    grids, features = _grids(hot_inside=True)
    trials = pointing_trials(grids, TRUTHS, features, families=("colour",))
    expected = sum(len({o["colour"] for o in TRUTHS[k]["objects"]}) for k in grids)
    assert len(trials) == expected
    result = pointing_game(trials)
    assert result["accuracy"] == 1.0 and 0 < result["chance"] < 0.5
    coverage = []  # chance by brute force: share of the 64 x 64 pixels' grid cells whose centre is in a box
    for trial in trials:
        boxes = [o["bbox"] for o in TRUTHS[trial["key"]]["objects"] if o["colour"] == trial["concept"]]
        centres = [((c + 0.5) * 8, (r + 0.5) * 8) for r in range(8) for c in range(8)]
        coverage.append(np.mean([any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes) for x, y in centres]))
    assert result["chance"] == pytest.approx(np.mean(coverage))
    missed, _ = _grids(hot_inside=False)
    assert pointing_game(pointing_trials(missed, TRUTHS, features, families=("colour",)))["accuracy"] == 0.0


# --------------------------------------------------------------------------- stage + browser


@pytest.fixture(scope="module")
def atlas(extracted, tmp_path_factory):
    root, _, models = extracted
    out = tmp_path_factory.mktemp("atlas")
    params = load_params(REPO / "params.yaml", overrides={
        "sample.out_dir": str(root / "data"), "extract.out_dir": str(root / "acts"),
        "reference.out_dir": str(root / "reference"), "vocab.out_dir": str(root / "vocab"),
        "atlas.variants": ["sparse", "dense"], "atlas.heatmap_models": ["sparse", "dense"],
        "atlas.min_word_count": 1, "atlas.out_dir": str(out / "atlas"),
    })
    return params, build_atlas(params), models


def test_atlas_tables_figures_and_pointing_game(atlas):
    params, summary, models = atlas
    out = Path(params.atlas.out_dir)
    width = models["sparse"][1]["width"]
    features = pq.read_table(f"{out}/sparse/features.parquet")
    assert features.num_rows == width and {"name", "words", "images", "modality", "density", "clarity"} <= set(
        features.column_names)
    evolution = pq.read_table(f"{out}/sparse/evolution.parquet")
    assert evolution.num_rows == width * 2  # one row per feature per snapshot (1pct, 100pct)
    assert set(summary["sparse"]["evolution"]) == {"1pct", "100pct"}
    pointing = summary["sparse"]["pointing"]
    token_keys = {k for k in pq.read_table(f"{params.extract.out_dir}/sparse/tokens").column("key").to_pylist()}
    truths = {r["key"]: json.loads(r["meta"])["truth"]
              for r in pq.read_table(f"{params.extract.out_dir}/sparse/images", columns=["key", "meta"]).to_pylist()}
    expected = sum(len({o[f] for o in truths[k]["objects"]}) for k in token_keys for f in ("shape", "colour"))
    assert pointing["trials"] == expected and 0 <= pointing["accuracy"] <= 1 and 0 < pointing["chance"] < 1
    for name in ("sparse/features.png", "sparse/evolution.png", "heatmaps.png", "index.html"):
        assert (out / name).is_file(), name


@pytest.fixture
def browser():
    chromium = Browser.start()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: scripts/setup.sh installs them (apt: chromium chromium-driver)")
        pytest.skip("chromium/chromedriver not installed")
    yield chromium
    chromium.close()


def test_atlas_in_headless_chromium(atlas, browser, tmp_path):
    params, _, models = atlas
    out = Path(params.atlas.out_dir)
    browser.open(out / "sparse" / "index.html")
    rows = browser.run("return document.querySelectorAll('tr.feature-row').length")
    assert rows == models["sparse"][1]["width"]
    features = browser.run("return FEATURES")
    query = next(f["name"] for f in features if f["name"])
    browser.type_into("#search", query)
    shown = browser.run("return [...document.querySelectorAll('tr.feature-row a')].map(a => a.textContent)")
    expected = {f"#{f['feature']}" for f in features if query in (f["name"] or "") or any(query in w for w in f["words"])}
    assert 0 < len(shown) < rows and set(shown) == expected
    assert browser.run("return document.getElementById('fires-for') !== null")  # "which features fire for this word"
    target = browser.run("return FEATURES.find(f => f.name).feature")
    browser.open(out / "sparse" / "features" / f"{target}.html")
    images = browser.run("return [...document.querySelectorAll('#images img')]"
                         ".map(i => i.complete && i.naturalWidth > 0)")
    assert images and all(images)
    assert browser.run("return document.querySelectorAll('#evolution tr').length") == 3  # header + 2 snapshots
    browser.screenshot(tmp_path / "feature.png")
    assert (tmp_path / "feature.png").stat().st_size > 1000


HOSTILE = '<img src=x onerror="window.pwned=1">'


def test_placeholders_are_filled_in_one_pass():
    """A value holding another placeholder's name stays literal (it used to paste later content)."""
    from pipeline.atlas.site import _fill

    assert _fill("__A__|__B__", A="__B__", B="x") == "__B__|x"
    assert _fill("__A__ __UNKNOWN__", A="1") == "1 __UNKNOWN__"


def test_hostile_vocabulary_is_shown_as_text_and_runs_nothing(browser, tmp_path):
    """Feature names and top words come from the vocabulary (user input with vocab.source: file):
    markup in them must appear as text in the index, in the search box's echo, and nowhere run."""
    from pipeline.atlas.site import write_index

    features = [{"feature": 0, "name": HOSTILE, "words": [HOSTILE, "__WORD_FEATURES__"], "modality": 0.5,
                 "density": 0.1, "clarity": 0.6},
                {"feature": 1, "name": "__WORD_FEATURES__", "words": ["red"], "modality": 0.5, "density": 0.2,
                 "clarity": 0.5}]
    page = write_index(tmp_path, "t", "s", features, {HOSTILE: [(0, 1.0)], "red": [(1, 0.5)]})
    browser.open(page)
    assert browser.run("return document.querySelectorAll('tr.feature-row').length") == 2
    cells = browser.run("return [...document.querySelectorAll('tr.feature-row td:nth-child(2)')].map(c => c.textContent)")
    assert set(cells) == {HOSTILE, "__WORD_FEATURES__"}
    assert browser.run("return document.querySelectorAll('tbody img').length") == 0
    browser.type_into("#search", HOSTILE)
    assert HOSTILE in browser.run("return document.getElementById('fires-for').textContent")
    assert browser.run("return document.querySelectorAll('#fires img, tbody img').length") == 0
    assert browser.run("return window.pwned === undefined")


# Words that broke the index page: `<!--<script>` switched the HTML tokenizer into its "double
# escaped" script state (the inline JSON escaped only `</`), so the script never ran; `__proto__`
# and `constructor` reached Object.prototype through a plain-object lookup, and the search threw.
SCRIPT_BREAKERS = ["<!--<script>", "</script>", "__proto__", "constructor", "a\u2028b"]


def _breaker_index(tmp_path: Path) -> tuple[Path, list[dict]]:
    from pipeline.atlas.site import write_index

    features = [{"feature": i, "name": word, "words": [word, "red"], "modality": 0.5, "density": 0.1 * (i + 1),
                 "clarity": 0.5} for i, word in enumerate(SCRIPT_BREAKERS)]
    words = {word: [(i, 1.0)] for i, word in enumerate(SCRIPT_BREAKERS) if word != "constructor"}
    return write_index(tmp_path, "t", "s", features, words), features


def _inline(page: str, const: str) -> str:
    """The JSON text a ``const NAME = ...;`` line of the page's script holds (one line each)."""
    line = next(ln for ln in page.splitlines() if ln.startswith(f"const {const} = "))
    return line.removeprefix(f"const {const} = ").removeprefix("new Map(").removesuffix(";").removesuffix(")")


def test_inline_json_holds_no_markup_and_parses_back_to_the_same_words(tmp_path):
    page, features = _breaker_index(tmp_path)
    text = page.read_text(encoding="utf-8")
    data = {const: _inline(text, const) for const in ("FEATURES", "WORD_FEATURES")}
    for const, raw in data.items():
        assert not set(raw) & {"<", ">", "&", "\u2028", "\u2029"}, const  # nothing the HTML tokenizer reads
    assert [(f["name"], f["words"]) for f in json.loads(data["FEATURES"])] == [
        (f["name"], f["words"]) for f in features]
    assert [word for word, _ in json.loads(data["WORD_FEATURES"])] == [w for w in SCRIPT_BREAKERS if w != "constructor"]


def test_script_breaking_words_fill_the_table_and_search_without_errors(browser, tmp_path):
    page, _ = _breaker_index(tmp_path)
    browser.open(page)
    browser.run("window.errors = []; window.addEventListener('error', e => window.errors.push(String(e.message)))")
    cells = browser.run("return [...document.querySelectorAll('tr.feature-row td:nth-child(2)')].map(c => c.textContent)")
    assert sorted(cells) == sorted(SCRIPT_BREAKERS)
    for query, fires in [("__proto__", "#2"), ("constructor", None), ("<!--<script>", "#0")]:
        browser.type_into("#search", query)
        assert browser.run("return window.errors") == [], query
        shown = browser.run("return document.getElementById('fires').textContent")
        assert (fires in shown) if fires else shown == "", (query, shown)
