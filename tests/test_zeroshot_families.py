"""One zero-shot task per concept family of the generated data, each with its chance level, and
a scoring that tells a model from a constant answer (issue 28, item 1)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.concepts import concept_ids
from pipeline.data.evalsets import LABELS, ZERO_SHOT_TASKS, _tasks_for, zero_shot_label
from pipeline.data.generator import render_record
from pipeline.data.records import Record
from pipeline.metrics.zeroshot import (
    constant_accuracy,
    labelled_rows,
    zero_shot_accuracy,
)


def records(n: int = 200) -> list[Record]:
    out = []
    for i in range(n):
        r = render_record(i, 0)
        out.append(Record(r.key, r.jpeg, r.caption, {"truth": r.truth}))
    return out


def test_every_concept_family_of_the_generator_has_a_task():
    families = {c.split(":")[0] for r in records() for c in r.meta["truth"]["concepts"]}
    assert families <= set(ZERO_SHOT_TASKS) and set(LABELS) == set(ZERO_SHOT_TASKS)
    assert families | {"count"} == set(ZERO_SHOT_TASKS)


def test_each_task_labels_a_record_by_its_ground_truth():
    tasks = _tasks_for(recs := records())
    assert tasks["count"]["classes"] == ["one", "two", "three"]
    for record in recs:
        truth = record.meta["truth"]
        main = truth["objects"][truth["main"]]
        ids = set(concept_ids(truth))
        for task in ("shape", "colour", "size", "position"):
            assert zero_shot_label(record.meta, task) == main[task]
            assert f"{task}:{main[task]}" in ids
        assert f"background:{zero_shot_label(record.meta, 'background')}" in ids
        assert zero_shot_label(record.meta, "count") == ["one", "two", "three"][len(truth["objects"]) - 1]
        word = zero_shot_label(record.meta, "word")
        assert word == (truth["word"]["text"] if truth["word"] else None)
        for task, spec in tasks.items():
            label = zero_shot_label(record.meta, task)
            assert label is None or label in spec["classes"]
    assert zero_shot_label({"caption": "a photo"}, "shape") is None  # no ground truth: not scored


@pytest.mark.parametrize("task", sorted(ZERO_SHOT_TASKS))
def test_a_perfect_predictor_scores_one_and_a_constant_scores_its_class_share(task):
    recs = records()
    classes = _tasks_for(recs)[task]["classes"]
    rows, labels = labelled_rows([zero_shot_label(r.meta, task) for r in recs], classes)
    assert len(rows) > 20
    classifier = np.eye(len(classes), 16)
    perfect = classifier[labels]
    assert zero_shot_accuracy(perfect, classifier, labels)["top1"] == 1.0
    for constant in range(len(classes)):
        share = float(np.mean(np.asarray(labels) == constant))
        scored = zero_shot_accuracy(np.tile(classifier[constant], (len(labels), 1)), classifier, labels)
        assert scored["top1"] == pytest.approx(share)
        assert scored["chance"] == constant_accuracy(labels) >= scored["top1"] - 1e-6


def test_chance_is_the_most_common_class_share():
    assert constant_accuracy([0, 0, 1, 2]) == 0.5
    assert constant_accuracy([1, 1, 1]) == 1.0
    assert constant_accuracy([0, 1, 2, 3]) == 0.25


def test_concept_recovery_scores_the_main_object_and_every_object_apart():
    """Coverage per scope (issue 28): a feature that fires on exactly the images whose *main*
    object is red detects "colour:red" perfectly among main objects and imperfectly among all
    objects (a red object beside another main one is a positive it misses); count is a concept."""
    import json

    import pyarrow as pa
    import scipy.sparse as sp

    from pipeline.config import MetricsParams
    from pipeline.metrics.evaluate import concept_recovery_metrics, pop_concept_tables

    recs = records(300)
    truths = [r.meta["truth"] for r in recs]
    main_red = np.array([t["objects"][t["main"]]["colour"] == "red" for t in truths])
    any_red = np.array([any(o["colour"] == "red" for o in t["objects"]) for t in truths])
    three = np.array([len(t["objects"]) == 3 for t in truths])
    assert (any_red & ~main_red).any() and main_red.any() and three.any()
    images = sp.csr_matrix(np.stack([main_red, three], axis=1).astype(np.float32))
    meta = pa.table({"meta": [json.dumps(r.meta) for r in recs]})
    params = MetricsParams(mono_auroc=0.95, mono_precision=0.95, precise_min_images=3)
    result = concept_recovery_metrics(meta, images, params)
    for scope in ("recovery", "recovery_main"):
        assert (result[scope]["mono_auroc"], result[scope]["mono_precision"],
                result[scope]["precise_min_images"]) == (0.95, 0.95, 3)
    tables = {name: {row["concept"]: row for row in rows} for name, rows in pop_concept_tables(result).items()}
    main, every = tables["concept_recovery_main"], tables["concept_recovery"]
    assert main["colour:red"]["auroc"] == 1.0 and main["colour:red"]["covered"]
    negatives = len(recs) - any_red.sum()
    expected = (main_red.sum() * negatives + 0.5 * (any_red & ~main_red).sum() * negatives) / (any_red.sum() * negatives)
    assert every["colour:red"]["auroc"] == pytest.approx(expected) and expected < 1.0
    assert main["count:three"]["auroc"] == every["count:three"]["auroc"] == 1.0
    assert main["colour:red"]["precise_features"] == 1 and main["colour:red"]["split_recall"] == 1.0
    assert "concepts" not in result["recovery"] and result["recovery_main"]["coverage_colour"] > 0
    with pytest.raises(ValueError, match="objects"):
        concept_ids(truths[0], objects="largest")
    no_truth = pa.table({"meta": [json.dumps({"caption": "a photo"})] * 3})
    assert concept_recovery_metrics(no_truth, sp.csr_matrix((3, 2)), MetricsParams()) == {}
