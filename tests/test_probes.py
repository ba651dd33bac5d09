"""Beyond zero-shot: the linear concept probes and the token segmentation probe score a
hand-built perfect feature as perfect and an uninformative one at chance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.metrics.probes import concept_probes, foreground, segmentation_probe


def labelled(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["red", "green", "blue"], size=n, p=[0.5, 0.3, 0.2])
    splits = np.where(np.arange(n) % 2 == 0, "val", "test")
    return labels, splits


def test_a_feature_per_class_is_read_perfectly_and_a_constant_scores_the_majority_share():
    labels, splits = labelled(300)
    onehot = (labels[:, None] == np.array(["red", "green", "blue"])[None]).astype(float)
    noisy = sp.csr_matrix(onehot * 3 + np.random.default_rng(1).random((300, 3)) * 0.5)
    perfect = concept_probes(noisy, splits, ["colour"], lambda task: list(labels))
    assert perfect["colour"]["accuracy"] == 1.0
    constant = concept_probes(np.ones((300, 4)), splits, ["colour"], lambda task: list(labels))["colour"]
    test_labels = labels[splits == "test"]
    majority = max(np.mean(test_labels == c) for c in ("red", "green", "blue"))
    assert constant["chance"] == pytest.approx(majority) and constant["accuracy"] == pytest.approx(majority)
    assert constant["n_fit"] == constant["n_scored"] == 150


def test_rows_without_a_label_and_tasks_with_one_class_are_left_out():
    labels, splits = labelled(100)
    partial = [None if i % 3 == 0 else label for i, label in enumerate(labels)]
    found = concept_probes(np.eye(100)[:, :8], splits, ["colour", "word"],
                           lambda task: partial if task == "colour" else ["same"] * 100)
    assert set(found) == {"colour"}
    assert found["colour"]["n_fit"] + found["colour"]["n_scored"] == sum(label is not None for label in partial)


def test_foreground_tokens_are_those_whose_centre_lies_in_a_box():
    truth = {"image_size": 64, "objects": [{"bbox": [0, 0, 31, 31]}]}  # the top-left quadrant
    assert foreground(2, truth).tolist() == [True, False, False, False]
    assert foreground(4, truth).tolist() == [True, True, False, False, True, True] + [False] * 10


def test_segmentation_probe_is_perfect_on_a_foreground_feature_and_a_guess_without_one():
    rng = np.random.default_rng(0)
    truths, informative, blind = {}, {}, {}
    for i in range(20):
        x0 = int(rng.integers(0, 32))
        truths[f"k{i}"] = {"image_size": 64, "objects": [{"bbox": [x0, 0, x0 + 31, 63]}]}
        inside = foreground(4, truths[f"k{i}"])
        informative[f"k{i}"] = sp.csr_matrix(np.stack([inside, ~inside], axis=1).astype(float) + 0.01)
        blind[f"k{i}"] = sp.csr_matrix(np.ones((16, 2)))
    result = segmentation_probe(informative, truths)
    assert result["auroc"] == 1.0 and result["tokens_per_image"] == 16 and result["images"] == 20
    assert segmentation_probe(blind, truths)["auroc"] == pytest.approx(0.5)
