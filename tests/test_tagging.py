"""Caption-based evaluation for photos without labels: tagging AUROC and naming agreement."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from pipeline.atlas.naming import caption_agreement
from pipeline.data.captions import caption_words
from pipeline.metrics.tagging import frequent_tags, tagging_auroc
from pipeline.vocab import noun_words


def test_caption_words_match_plurals():
    words = caption_words("Two dogs run past the benches .")
    assert {"dog", "dogs", "bench", "benches", "two", "run"} <= words
    assert "." not in words


def test_frequent_tags_need_positives_and_negatives():
    image_words = [{"dog", "grass"}, {"dog"}, {"dog", "car"}, {"grass"}]
    assert frequent_tags(image_words, ["dog", "grass", "car"], n=5, min_images=1) == ["dog", "grass", "car"]
    assert frequent_tags(image_words, ["dog", "grass", "car"], n=5, min_images=2) == ["dog", "grass"]
    assert frequent_tags([{"dog"}, {"dog"}], ["dog"], n=5, min_images=1) == []  # on every image: no negatives


def test_tagging_auroc_matches_sklearn_with_ties_and_sparse_rows():
    rng = np.random.default_rng(0)
    images = np.maximum(rng.normal(size=(60, 12)), 0).round(1)  # ReLU'd and rounded: ties and zeros
    tags = np.maximum(rng.normal(size=(4, 12)), 0)
    labels = rng.random((60, 4)) < 0.3
    got = tagging_auroc(sp.csr_matrix(images), sp.csr_matrix(tags), labels)
    unit = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    scores = unit @ (tags / np.linalg.norm(tags, axis=1, keepdims=True)).T
    expected = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(4)]
    assert np.allclose(got, expected)
    assert np.allclose(tagging_auroc(images, tags, labels), expected)  # dense input, same numbers


def test_tagging_auroc_of_a_perfect_and_a_constant_scorer():
    tag = np.array([[1.0, 0.0]])
    labels = np.array([[True], [False], [True], [False]])
    perfect = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])
    assert tagging_auroc(perfect, tag, labels)[0] == 1.0
    assert tagging_auroc(np.ones((4, 2)), tag, labels)[0] == 0.5
    assert np.isnan(tagging_auroc(perfect, tag, np.ones((4, 1), dtype=bool))[0])


def test_caption_agreement_against_its_chance_level():
    features = pa.table({"name": ["dog", "car", None], "images": [["a", "b"], ["a", "c"], ["b"]]})
    words = {"a": {"dog", "grass"}, "b": {"dog"}, "c": {"beach"}, "d": {"car"}}
    out = caption_agreement(features, words)
    assert out["features"] == 2
    assert out["agreement"] == pytest.approx((1.0 + 0.0) / 2)  # dog: both top images; car: neither
    assert out["chance"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["agreeing_share"] == 0.5


def test_noun_words_keep_nouns_and_drop_function_words():
    nouns = noun_words(["dog", "grass", "red", "shirt", "the", "is", "in", "a", "hot dog", "wearing"])
    assert nouns == ["dog", "grass", "shirt"]  # "red" heads red.n.01 but is used as an adjective


def test_a_word_is_a_noun_where_its_commonest_use_is_one():
    # WordNet's sense-tagged counts: white a76/n6, watch v176/n17, little a257/n12; inflections
    # count a quarter of their base: playing (play v) and sitting (sit v) are verbs, building a noun
    words = ["white", "watch", "little", "playing", "sitting", "building", "painting", "man", "background"]
    assert noun_words(words) == ["building", "painting", "man", "background"]


def test_subject_answers_come_from_the_noun_most_captions_use():
    from pipeline.vlm.questions import QUESTIONS, qa_from_captions

    metas = [{"group": "p1", "key": "a"}, {"group": "p1", "key": "b"}, {"group": "p2", "key": "c"},
             {"group": "p3", "key": "d"}]
    captions = {"p1": ["A dog runs on the grass .", "Two dogs play", "A brown dog on a lawn"],
                "p2": ["A man in a red shirt", "A girl and a man"], "p3": ["is in the"]}
    examples = qa_from_captions(metas, captions, ["subject", "colour"])
    assert [(e["image"], e["answer"]) for e in examples] == [(0, "dog"), (2, "man")]  # one per photo; p3 has no noun
    assert all(e["question"] == QUESTIONS["subject"] and e["type"] == "subject" for e in examples)
    assert qa_from_captions(metas, captions, ["colour"]) == []


def test_qa_metrics_score_one_word_subjects_from_captions():
    from pipeline.vlm.evaluate import qa_metrics

    examples = [{"type": "subject", "answer": a} for a in ("dog", "man", "girl")]
    out = qa_metrics(["a dog", "woman", "girl"], examples)
    assert out["subject.exact"] == 2 / 3 and "subject.colour_named" not in out
