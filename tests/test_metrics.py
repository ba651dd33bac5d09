"""pipeline.metrics against independent brute-force references on small seeded data, for dense
and scipy.sparse inputs alike."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from pipeline import metrics

# Dense and several sparse layouts: every metric must give the same answer for each.
LAYOUTS = {
    "dense": np.asarray,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
    "csr_array": sp.csr_array,
}


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    return LAYOUTS[request.param]


def sparse_relu(rng, n, width, fill=0.2, scale=1.0):
    """Dense (n x width) non-negative array with about ``fill`` of entries non-zero."""
    values = rng.exponential(scale, size=(n, width))
    return np.where(rng.random((n, width)) < fill, values, 0.0)


# ---- sparsity -----------------------------------------------------------------------------


def test_sparsity_matches_numpy(layout):
    rng = np.random.default_rng(0)
    a = sparse_relu(rng, 40, 12, fill=0.15)
    a[:, 3] = 0.0  # dead
    a[:, 5] = 0.0
    a[7, 5] = 0.4  # fires on exactly one row: alive but not active at n_min = 2
    x = layout(a)

    assert metrics.l0(x) == pytest.approx((a != 0).sum(1).mean())
    assert np.array_equal(metrics.feature_counts(x, tau=0.5), (a > 0.5).sum(0))
    assert np.array_equal(metrics.active_features(x, n_min=2), (a > 0).sum(0) >= 2)
    assert metrics.active_fraction(x, tau=0.3, n_min=3) == pytest.approx(((a > 0.3).sum(0) >= 3).mean())
    assert metrics.dead_fraction(x) == pytest.approx(((a > 0).sum(0) == 0).mean())
    assert metrics.density(x) == pytest.approx((a != 0).mean())

    peak = a.max(0)
    expected = np.divide(a.mean(0), peak, out=np.zeros(12), where=peak > 0)
    assert np.allclose(metrics.feature_density(x), expected)
    assert metrics.feature_density(x)[3] == 0.0

    summary = metrics.sparsity_summary(x)
    assert set(summary) == {"l0", "l0_pct", "active_fraction", "dead_fraction", "density", "width"}
    assert summary["width"] == 12
    assert summary["l0_pct"] == pytest.approx(100 * summary["l0"] / 12)


def test_dense_all_nonzero_has_l0_equal_width(layout):
    a = np.random.default_rng(1).normal(size=(9, 7))  # no ReLU: every entry non-zero
    assert metrics.l0(layout(a)) == 7
    assert metrics.density(layout(a)) == 1.0


def test_stored_zeros_do_not_count():
    a = sp.csr_matrix((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 2, 2])), shape=(2, 3))
    assert metrics.l0(a) == 0.5
    assert a.nnz == 2  # the caller's matrix is left alone


def test_metrics_leave_sparse_inputs_untouched():
    rng = np.random.default_rng(11)
    a = sp.csr_matrix(sparse_relu(rng, 20, 6, fill=0.5))
    a.data[::3] = 0.0005  # below Clarity's tau: pruned from its membership matrix
    original = a.copy()
    metrics.sparsity_summary(a)
    metrics.feature_density(a)
    metrics.clarity(a, rng.normal(size=(20, 4)))
    metrics.modality_scores(a, a)
    metrics.keep_topk(a, 2)
    metrics.concept_recovery(a, rng.random((20, 2)) < 0.5, ["x", "y"])
    for field in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(a, field), getattr(original, field))


# ---- clarity ------------------------------------------------------------------------------


def brute_force_clarity(a, e, tau, n_min):
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    scores = np.full(a.shape[1], np.nan)
    for i in range(a.shape[1]):
        members = np.flatnonzero(a[:, i] > tau)
        if len(members) < n_min:
            continue
        sims = [u[j] @ u[k] for j, k in itertools.permutations(members, 2)]
        scores[i] = np.mean(sims)
    active = ~np.isnan(scores)
    return (scores[active].mean() if active.any() else np.nan), scores


@pytest.mark.parametrize("tau,n_min", [(0.001, 2), (0.5, 2), (0.2, 4)])
def test_clarity_matches_pairwise_loop(layout, tau, n_min):
    rng = np.random.default_rng(2)
    a = sparse_relu(rng, 30, 10, fill=0.25)
    a[:, 0] = 0.0
    a[4, 0] = 3.0  # active on exactly one row: excluded
    e = rng.normal(size=(30, 6)) + 0.5
    expected, expected_scores = brute_force_clarity(a, e, tau, n_min)

    value, scores = metrics.clarity(layout(a), e, tau=tau, n_min=n_min, per_feature=True)
    assert np.isnan(scores[0])
    assert np.allclose(scores, expected_scores, atol=1e-6, equal_nan=True)
    assert value == pytest.approx(expected, abs=1e-6)
    assert metrics.clarity(layout(a), e, tau=tau, n_min=n_min) == pytest.approx(expected, abs=1e-6)
    assert metrics.c_score(layout(a), e, threshold=tau, n_min=n_min) == value


def test_clarity_threshold_is_strict_and_nan_without_active_features(layout):
    e = np.random.default_rng(3).normal(size=(4, 3))
    a = np.zeros((4, 2))
    a[:2, 0] = 0.001  # equal to tau, so not > tau
    a[2, 1] = 5.0  # a single row
    assert np.isnan(metrics.clarity(layout(a), e, tau=0.001))
    value, scores = metrics.clarity(layout(a), e, tau=0.0005, per_feature=True)
    assert np.isnan(scores[1])
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert value == pytest.approx(u[0] @ u[1])


def test_identical_embeddings_give_clarity_one():
    e = np.tile([[1.0, 2.0, 3.0]], (5, 1))
    assert metrics.clarity(np.ones((5, 2)), e) == pytest.approx(1.0)
    assert metrics.dataset_baseline(e) == pytest.approx(1.0)


def test_dataset_baseline_matches_pairwise_loop():
    e = np.random.default_rng(4).normal(size=(25, 8)).astype(np.float32) + 0.3
    u = e.astype(np.float64) / np.linalg.norm(e.astype(np.float64), axis=1, keepdims=True)
    expected = np.mean([u[j] @ u[k] for j, k in itertools.permutations(range(25), 2)])
    assert metrics.dataset_baseline(e) == pytest.approx(expected, abs=1e-6)


def test_clarity_rejects_mismatched_or_zero_embeddings():
    with pytest.raises(ValueError):
        metrics.clarity(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError):
        metrics.clarity(np.ones((2, 2)), np.array([[1.0, 0.0], [0.0, 0.0]]))


# ---- modality -----------------------------------------------------------------------------


def test_modality_hand_computed(layout):
    # features: image-only, text-only, shared, dead, image-heavy; on unit-norm rows
    image = np.array([[2.0, 0.0, 1.0, 0.0, 3.0],
                      [0.0, 0.0, 1.0, 0.0, 3.0]])
    text = np.array([[0.0, 1.0, 2.0, 0.0, 2.0],
                     [0.0, 5.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 1.0, 0.0, 1.0],
                     [0.0, 0.0, 1.0, 0.0, 1.0]])
    scores = metrics.modality_scores(layout(image), layout(text))
    image_mean = (image / np.linalg.norm(image, axis=1, keepdims=True)).mean(0)  # brute force
    text_mean = (text / np.linalg.norm(text, axis=1, keepdims=True)).mean(0)
    with np.errstate(invalid="ignore"):
        expected = image_mean / (image_mean + text_mean)
    assert np.allclose(scores, expected, equal_nan=True)
    assert np.allclose(scores[[0, 1, 3]], [1.0, 0.0, np.nan], equal_nan=True)
    assert scores[2] == pytest.approx((1 / 14**0.5 + 1 / 10**0.5) / 2 / ((1 / 14**0.5 + 1 / 10**0.5) / 2
                                                                         + (2 / 3 + 2 / 2**0.5) / 4))

    summary = metrics.modality_summary(scores)
    assert summary["n_features"] == 4
    assert summary["image_only"] == pytest.approx(0.25)
    assert summary["text_only"] == pytest.approx(0.25)
    assert summary["multimodal"] == pytest.approx(0.5)


def test_modality_does_not_depend_on_either_towers_scale(layout):
    """The loss sees unit-norm embeddings: rescaling one modality (as a whole, or each input) by
    any positive factor changes nothing it is trained on, and must change no score."""
    rng = np.random.default_rng(3)
    image, text = sparse_relu(rng, 30, 16, 0.3), sparse_relu(rng, 50, 16, 0.3)
    scores = metrics.modality_scores(layout(image), layout(text))
    for scaled_image, scaled_text in [(10 * image, text), (image, 0.01 * text),
                                      (image * rng.uniform(0.1, 100, (30, 1)), text)]:
        assert np.allclose(metrics.modality_scores(layout(scaled_image), layout(scaled_text)), scores,
                           equal_nan=True)
    assert np.nanmean(scores) < 0.9  # not a degenerate all-image case that would pass trivially


def test_modality_plot_writes_png(tmp_path):
    rng = np.random.default_rng(5)
    image, text = sparse_relu(rng, 50, 64, 0.1), sparse_relu(rng, 80, 64, 0.1)
    scores = metrics.modality_scores(sp.csr_matrix(image), sp.csr_matrix(text))
    density = metrics.feature_density(np.vstack([image, text]))
    path = metrics.plot_modality_density(scores, density, tmp_path / "plots" / "modality.png", title="test")
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- retrieval ----------------------------------------------------------------------------


def brute_force_retrieval(images, texts, owner, ks):
    ui = images / np.linalg.norm(images, axis=1, keepdims=True)
    ut = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sims = ut @ ui.T  # captions x images
    ir_rank = [list(np.argsort(-sims[t])).index(owner[t]) for t in range(len(texts))]
    tr_rank = [min(list(np.argsort(-sims[:, i])).index(t) for t in np.flatnonzero(owner == i))
               for i in range(len(images))]
    out = {}
    for k in ks:
        out[f"image_retrieval_r{k}"] = np.mean(np.array(ir_rank) < k)
        out[f"text_retrieval_r{k}"] = np.mean(np.array(tr_rank) < k)
    return out


def test_retrieval_matches_argsort(monkeypatch):
    rng = np.random.default_rng(6)
    n_images, d = 20, 8
    owner = np.repeat(np.arange(n_images), rng.integers(2, 4, size=n_images))  # 2-3 captions each
    rng.shuffle(owner)
    images = rng.normal(size=(n_images, d))
    texts = images[owner] + 1.2 * rng.normal(size=(len(owner), d))  # noisy captions
    expected = brute_force_retrieval(images, texts, owner, (1, 5, 10))

    assert metrics.retrieval_recall(images, texts, owner, ks=(1, 5, 10)) == pytest.approx(expected)
    monkeypatch.setattr("pipeline.metrics.retrieval._BLOCK_ELEMENTS", 70)  # many small blocks
    got = metrics.retrieval_recall(images, texts, owner)
    assert set(got) == {"image_retrieval_r1", "image_retrieval_r5", "text_retrieval_r1", "text_retrieval_r5"}
    assert got == pytest.approx({key: expected[key] for key in got})


def test_sparse_embeddings_retrieve_as_dense_ones_without_densifying(monkeypatch):
    rng = np.random.default_rng(16)
    owner = np.repeat(np.arange(30), 2)
    images = sparse_relu(rng, 30, 50, fill=0.2) + 0.0
    texts = np.where(rng.random((60, 50)) < 0.5, images[owner], 0.0) + sparse_relu(rng, 60, 50, fill=0.05)
    expected = metrics.retrieval_recall(images, texts, owner, ks=(1, 5))
    monkeypatch.setattr("pipeline.metrics.retrieval._BLOCK_ELEMENTS", 200)  # several blocks
    assert metrics.retrieval_recall(sp.csr_matrix(images), sp.csr_matrix(texts), owner, ks=(1, 5)) == expected


def test_an_all_zero_code_finds_nothing_and_is_found_last():
    """A caption whose code is all zero is a miss at every k (its similarities all tie at 0, which
    would otherwise count as rank 0); an all-zero image ranks below every other image."""
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    texts = np.array([[1.0, 0.1], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    owner = np.array([0, 1, 1, 2])  # caption 1 is empty; image 2 is empty
    for layout in (np.asarray, sp.csr_matrix):
        got = metrics.retrieval_recall(layout(images), layout(texts), owner, ks=(1, 2, 3))
        # captions: 0 hits image 0 (rank 0); 1 is empty (miss); 2 finds image 1 (rank 0); 3's image
        # is empty, ranked after images 0 and 1 (rank 2)
        assert got["image_retrieval_r1"] == 0.5 and got["image_retrieval_r2"] == 0.5
        assert got["image_retrieval_r3"] == 0.75
        # images: 0's caption first (rank 0); 1's best caption (2 or 3) ties with the other at the
        # top (rank 0); the empty image finds nothing (rank = every caption)
        assert got["text_retrieval_r1"] == pytest.approx(2 / 3) and got["text_retrieval_r3"] == pytest.approx(2 / 3)


def test_recall_difference_is_a_paired_bootstrap_over_photos():
    rng = np.random.default_rng(3)
    photos = np.repeat(np.arange(40), 5)  # five captions per photo
    baseline = rng.random(200) < 0.4
    better = baseline | (rng.random(200) < 0.2)  # the same queries, some more hits
    got = metrics.recall_difference(better, baseline, photos, resamples=500, seed=9)
    assert got["difference"] == pytest.approx(better.mean() - baseline.mean())
    assert got["queries"] == 200 and got["photos"] == 40
    # independent reference: draw photos with replacement, take all their queries, both models
    draws = np.random.default_rng(9).multinomial(40, np.full(40, 1 / 40), size=500)
    boot = [np.mean(np.concatenate([np.repeat(better[photos == p].astype(float) - baseline[photos == p], c)
                                    for p, c in enumerate(row) if c]))
            for row in draws]
    assert [got["ci95_low"], got["ci95_high"]] == pytest.approx(np.quantile(boot, [0.025, 0.975]))
    assert 0 < got["ci95_low"] < got["difference"] < got["ci95_high"]  # every change is a gain: above 0


def test_recall_difference_of_a_model_with_itself_is_zero_and_sizes_must_match():
    hits = np.array([True, False, True, True])
    assert metrics.recall_difference(hits, hits, np.array([0, 0, 1, 2]), resamples=50) == {
        "difference": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "queries": 4, "photos": 3}
    with pytest.raises(ValueError, match="one entry per query"):
        metrics.recall_difference(hits, hits[:3], np.array([0, 0, 1, 2]))


def test_retrieval_ranks_are_what_recall_counts():
    rng = np.random.default_rng(4)
    owner = np.array([0, 0, 1, 2, 2, 2])
    images, texts = rng.normal(size=(4, 6)), rng.normal(size=(6, 6))  # image 3 has no caption
    caption_ranks, image_ranks = metrics.retrieval_ranks(images, texts, owner)
    assert caption_ranks.shape == (6,) and image_ranks.shape == (3,)
    recall = metrics.retrieval_recall(images, texts, owner, ks=(1, 2))
    assert recall["image_retrieval_r2"] == np.mean(caption_ranks < 2)
    assert recall["text_retrieval_r1"] == np.mean(image_ranks < 1)


# ---- top-k --------------------------------------------------------------------------------


def test_keep_topk_matches_row_argsort(layout):
    rng = np.random.default_rng(7)
    a = sparse_relu(rng, 25, 15, fill=0.4)
    a = np.round(a, 1)  # creates ties
    for k in (1, 2, 4, 100):
        expected = np.zeros_like(a)
        for r, row in enumerate(a):
            nonzero = np.flatnonzero(row)
            keep = nonzero[np.lexsort((nonzero, -row[nonzero]))][:k]  # value desc, lower index first
            expected[r, keep] = row[keep]
        got = metrics.keep_topk(layout(a), k)
        assert sp.issparse(got) and got.has_canonical_format
        assert np.array_equal(got.toarray(), expected)
    assert np.array_equal(metrics.keep_topk(layout(a), 15).toarray(), a)


def test_keep_topk_ties_go_to_lower_index():
    kept = metrics.keep_topk(np.array([[0.0, 2.0, 1.0, 2.0, 2.0]]), 2).toarray()
    assert np.array_equal(kept, [[0.0, 2.0, 0.0, 2.0, 0.0]])


def test_keep_topk_on_stored_nonzeros_is_the_dense_rule_of_the_heads_and_saes(layout):
    """One rule, two data structures: the CSR form used by top-k zero-shot keeps what
    :func:`pipeline.topk.keep_top` (TopK head, TopK SAE) keeps, on ties-free activations."""
    import torch

    from pipeline.topk import keep_top

    a = sparse_relu(np.random.default_rng(9), 30, 20, fill=0.5)
    for k in (1, 3, 8):
        dense = keep_top(torch.as_tensor(a), k, dim=1).numpy()
        assert np.array_equal(metrics.keep_topk(layout(a), k).toarray(), dense)


# ---- concept recovery ---------------------------------------------------------------------


def test_auroc_matrix_matches_sklearn(layout):
    rng = np.random.default_rng(8)
    n, width, concepts = 60, 9, 4
    a = np.round(sparse_relu(rng, n, width, fill=0.3), 1)  # many ties, zeros included
    a[:, 2] = 0.0  # silent feature: 0.5 everywhere
    a[:, 6] = np.where(rng.random(n) < 0.5, -rng.exponential(size=n), a[:, 6])  # negatives below zero
    labels = (rng.random((n, concepts)) < 0.3).astype(int)
    labels[:, 1] = 0
    labels[:10, 1] = 1
    a[:, 4] = labels[:, 1] * 2.0  # perfect detector of concept 1

    got = metrics.auroc_matrix(layout(a), labels)
    expected = np.array([[roc_auc_score(labels[:, c], a[:, i]) for c in range(concepts)] for i in range(width)])
    assert np.allclose(got, expected, atol=1e-12)
    assert np.all(got[2] == 0.5)
    assert got[4, 1] == 1.0


def test_auroc_undefined_for_constant_concept():
    got = metrics.auroc_matrix(sp.csr_matrix(np.eye(3)), np.array([[1, 0], [1, 1], [1, 0]]))
    assert np.isnan(got[:, 0]).all() and not np.isnan(got[:, 1]).any()


def test_best_f1_matches_threshold_scan():
    rng = np.random.default_rng(9)
    scores = np.round(rng.random(50), 1)
    labels = rng.random(50) < 0.4
    best = max((2 * (labels & (scores >= t)).sum() / ((scores >= t).sum() + labels.sum()), t)
               for t in np.unique(scores))  # ties on F1 go to the higher threshold
    assert metrics.best_f1(scores, labels) == pytest.approx(best)
    assert metrics.best_f1([0.5, 0.5, 0.2], [0, 0, 0]) == (0.0, 0.5)  # no positives: F1 is 0


def test_concept_recovery_on_planted_features(layout):
    rng = np.random.default_rng(10)
    n, width = 200, 8
    labels = np.zeros((n, 3), dtype=int)
    labels[:10, 0] = 1  # concepts 0 and 2 are rare, so one feature can detect both well
    labels[10:20, 2] = 1
    labels[:, 1] = rng.random(n) < 0.3
    a = sparse_relu(rng, n, width, fill=0.05, scale=0.1)
    a[:, 3] = labels[:, 1] * 1.5  # feature 3 is concept 1
    a[:, 5] = (labels[:, 0] | labels[:, 2]) * 1.0  # feature 5 fires for concepts 0 and 2
    a[:, 7] = 0.0  # dead: not counted among active features

    report = metrics.concept_recovery(layout(a), labels, ["a", "b", "c"])
    auroc = metrics.auroc_matrix(a, labels)
    assert report.best_feature[1] == 3
    assert report.best_auroc[1] == 1.0 and report.best_f1[1] == 1.0
    assert report.best_threshold[1] == 1.5
    assert np.sort(auroc[5])[-2] >= 0.9  # feature 5 is good at two concepts: not monosemantic
    assert report.n_active_features == width - 1

    selective = [i for i in range(width - 1)
                 if np.sort(auroc[i])[-1] >= 0.9 and np.sort(auroc[i])[-2] < 0.9]
    assert 3 in selective and 5 not in selective
    assert report.monosemantic_fraction == pytest.approx(len(selective) / (width - 1))

    table = report.to_dict()
    assert table["concepts"][1] == {"concept": "b", "best_feature": 3, "auroc": 1.0, "covered": True, "f1": 1.0,
                                    "threshold": 1.5, "precise_features": 1, "split_recall": 1.0}
    assert table["mean_best_auroc"] == pytest.approx(report.best_auroc.mean())
    assert table["mean_best_f1"] == pytest.approx(report.best_f1.mean())


def test_concept_coverage_counts_concepts_some_single_feature_detects_per_family():
    """Coverage (issue 28): a concept is covered when its best feature's AUROC reaches the bar;
    shares overall and per family ("family:value"), and active features per covered concept."""
    rng = np.random.default_rng(4)
    n = 300
    labels = (rng.random((n, 4)) < 0.3).astype(int)
    a = np.zeros((n, 6))
    a[:, 0] = labels[:, 0] * 2.0  # shape:circle, perfectly
    a[:, 1] = labels[:, 2] * 1.0 + (rng.random(n) < 0.05)  # colour:red, nearly (AUROC > 0.9)
    a[:, 2] = rng.random(n) * (rng.random(n) < 0.5)  # noise: detects nothing
    names = ["shape:circle", "shape:square", "colour:red", "colour:blue"]
    report = metrics.concept_recovery(a, labels, names)
    assert list(report.covered) == [True, False, True, False]
    coverage = report.to_dict()
    assert coverage["coverage"] == 0.5 and coverage["coverage_shape"] == 0.5 and coverage["coverage_colour"] == 0.5
    assert coverage["active_per_covered_concept"] == report.n_active_features / 2 == 1.5
    assert [c["covered"] for c in coverage["concepts"]] == [True, False, True, False]
    nothing = metrics.concept_recovery(np.zeros((n, 3)), labels, names).to_dict()
    assert nothing["coverage"] == 0.0 and math.isnan(nothing["active_per_covered_concept"])


def test_training_window_reports_what_the_metrics_compute_on_the_same_rows():
    """The training curves' L0 and dead fraction (a streaming tally over batches) are the
    metrics module's numbers on the concatenated batches, not a second definition."""
    import torch

    from pipeline.clip.recipe import SparsityWindow

    rng = np.random.default_rng(3)
    batches = [(sparse_relu(rng, 16, 40, fill=0.05), sparse_relu(rng, 16, 40, fill=0.1)) for _ in range(3)]
    for image, text in batches:
        image[:, :10] = text[:, :10] = 0  # ten features dead on both towers
    window = SparsityWindow(width=40)
    for image, text in batches:
        window.update(torch.as_tensor(image), torch.as_tensor(text))
    summary = window.summary()
    images, texts = (np.concatenate(tower) for tower in zip(*batches))
    assert summary["l0_image"] == pytest.approx(metrics.l0(images))
    assert summary["l0_text_pct"] == pytest.approx(100 * metrics.l0(texts) / 40)
    both = np.concatenate([images, texts])
    assert 0 < summary["dead_fraction"] == pytest.approx(metrics.dead_fraction(both))


def _keep_topk_reference(a, k):
    """Dense brute force: each row's k largest non-zeros, ties to the lower index."""
    expected = np.zeros_like(a)
    for r, row in enumerate(a):
        nonzero = np.flatnonzero(row)
        keep = nonzero[np.lexsort((nonzero, -row[nonzero]))][:k]
        expected[r, keep] = row[keep]
    return expected


@pytest.mark.parametrize("budget", [7, 64, 1 << 22])
def test_keep_topk_in_blocks_matches_brute_force(monkeypatch, budget):
    """Blocks of a few rows (padded sort) and skewed rows (one long row: the lexsort fallback)."""
    from pipeline.metrics import topk

    monkeypatch.setattr(topk, "_NNZ_PER_BLOCK", budget)
    rng = np.random.default_rng(12)
    a = np.round(sparse_relu(rng, 60, 40, fill=0.15), 1).astype(np.float32)  # ties
    a[5] = np.round(rng.exponential(size=40), 1)  # a full row among short ones
    a[9] = 0.0  # an empty row
    for k in (1, 3, 8, 40):
        got = metrics.keep_topk(sp.csr_matrix(a), k)
        assert got.has_canonical_format and got.dtype == np.float32
        assert np.array_equal(got.toarray(), _keep_topk_reference(a, k))


def test_labels_topk_scores_equal_the_densified_classifier():
    """topk_cut_scores keeps the cut classifier sparse; the scores equal the dense product's."""
    from pipeline.metrics.zeroshot import cosine_scores
    from pipeline.metrics._arrays import unit_sparse_rows
    from pipeline.metrics.registry import topk_cut_scores

    rng = np.random.default_rng(13)
    images = sp.csr_matrix(sparse_relu(rng, 50, 30, fill=0.3).astype(np.float32))
    classifier = rng.random((4, 30))
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    for k in (1, 4, 30):
        dense = cosine_scores(images, unit_sparse_rows(metrics.keep_topk(classifier, k)).toarray())
        assert np.array_equal(topk_cut_scores("labels_topk", images, classifier, k), dense)


@pytest.mark.parametrize("chunk", [5, 1 << 22])
def test_chunked_column_reductions_match_dense(monkeypatch, chunk):
    """feature_counts, feature_density and modality_scores run chunk by chunk (tiny chunks here)
    and agree with dense numpy: counts exactly, sums to float64 rounding."""
    from pipeline.metrics import _arrays

    monkeypatch.setattr(_arrays, "_NNZ_PER_CHUNK", chunk)
    rng = np.random.default_rng(14)
    images = sparse_relu(rng, 45, 20, fill=0.2).astype(np.float32)
    texts = sparse_relu(rng, 30, 20, fill=0.2, scale=7.0).astype(np.float32)
    images[:, 2] = texts[:, 2] = 0.0  # dead: NaN modality
    images[3] = 0.0  # an empty row stays zero
    x, t = sp.csr_matrix(images), sp.csr_matrix(texts)

    assert np.array_equal(metrics.feature_counts(x, tau=0.3), (images > 0.3).sum(0))
    peak = images.max(0).astype(np.float64)
    mean = images.astype(np.float64).mean(0)
    assert np.allclose(metrics.feature_density(x), np.divide(mean, peak, out=np.zeros(20), where=peak > 0),
                       rtol=1e-12, atol=0)

    def unit(a):
        a = a.astype(np.float64)
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)

    image_mean, text_mean = unit(images).mean(0), unit(texts).mean(0)
    expected = np.divide(image_mean, image_mean + text_mean, out=np.full(20, np.nan),
                         where=image_mean + text_mean > 0)
    # rtol 1e-6: the row norms square float32 values in float32 (as unit_sparse_rows always did)
    assert np.allclose(metrics.modality_scores(x, t), expected, rtol=1e-6, atol=0, equal_nan=True)
    # and the unit-row matrix it no longer builds gives the same sums
    assert np.allclose(_arrays.unit_positive_column_sums(x),
                       _arrays.positive_column_sums(_arrays.unit_sparse_rows(x)), rtol=1e-12, atol=0)


def test_cosine_scores_in_row_blocks_equal_one_pass(monkeypatch):
    """cosine_scores converts a block of rows at a time; the scores equal the one-pass product."""
    from pipeline.metrics import zeroshot

    rng = np.random.default_rng(15)
    a = sparse_relu(rng, 70, 25, fill=0.3).astype(np.float32)
    a[4] = 0.0
    classifier = rng.random((6, 25))
    rows = sp.csr_matrix(a, dtype=np.float64)
    norms = np.sqrt(np.asarray(rows.multiply(rows).sum(axis=1)).ravel())
    expected = np.asarray(rows @ classifier.T) / np.maximum(norms, 1e-12)[:, None]
    for block in (1, 16, 1 << 16):
        monkeypatch.setattr(zeroshot, "_ROWS_PER_BLOCK", block)
        for layout in (np.asarray, sp.csr_matrix, sp.csc_matrix):
            assert np.array_equal(zeroshot.cosine_scores(layout(a), classifier), expected)
    assert zeroshot.cosine_scores(sp.csr_matrix((0, 25)), classifier).shape == (0, 6)


def test_map_blocks_keeps_order_and_bounds_what_is_in_flight():
    """Results come back in block order on any thread count, with at most threads + 1 blocks
    started and not yet consumed (a fold over partial sums holds a few, not all)."""
    import threading

    from pipeline.metrics._arrays import block_threads, map_blocks

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        return i * i

    with block_threads(3):
        results = []
        for value in map_blocks(work, range(20)):
            with lock:
                assert len(started) - len(results) <= 4
            results.append(value)
    assert results == [i * i for i in range(20)]
    assert list(map_blocks(work, range(3))) == [0, 1, 4]  # outside: on the calling thread
    with pytest.raises(ValueError, match="threads"):
        with block_threads(0):
            pass


def test_metrics_give_the_same_bits_on_several_threads(monkeypatch):
    """Clarity, cosine scores and keep_topk in many small blocks on 4 threads equal 1 thread."""
    import importlib

    from pipeline.metrics import zeroshot
    from pipeline.metrics import topk
    from pipeline.metrics._arrays import block_threads

    clarity = importlib.import_module("pipeline.metrics.clarity")  # the package exports the function
    monkeypatch.setattr(clarity, "_ROWS_PER_BLOCK", 7)
    monkeypatch.setattr(zeroshot, "_ROWS_PER_BLOCK", 5)
    monkeypatch.setattr(topk, "_NNZ_PER_BLOCK", 11)
    rng = np.random.default_rng(16)
    a = sp.csr_matrix(sparse_relu(rng, 90, 30, fill=0.25).astype(np.float32))
    reference = rng.normal(size=(90, 8))
    classifier = rng.random((5, 30))

    def everything():
        return (metrics.clarity(a, reference, per_feature=True)[1], zeroshot.cosine_scores(a, classifier),
                metrics.keep_topk(a, 3).toarray())

    one = everything()
    with block_threads(4):
        four = everything()
    for x, y in zip(one, four):
        assert np.array_equal(x, y, equal_nan=True)


def test_precise_features_against_brute_force(layout):
    """A concept split over features that each fire on part of its images and nothing else: each
    is precise, none reaches the AUROC bar alone, and together they cover the concept. A feature
    firing on too few images is not judged however precise; exactly the bar counts; negative values
    do not fire; a concept on nearly every image is nobody's. Numbers equal a loop over features."""
    rng = np.random.default_rng(11)
    n = 400
    labels = np.zeros((n, 4), dtype=int)
    labels[:, 0] = rng.random(n) < 0.4
    labels[:, 1] = rng.random(n) < 0.5
    labels[:, 2] = rng.random(n) < 0.2
    labels[:, 3] = np.arange(n) >= 20  # on 95% of the images
    a = np.zeros((n, 8))
    positives = np.flatnonzero(labels[:, 0])
    halves = np.array_split(rng.permutation(positives), 2)
    a[halves[0], 0] = 1.0 + rng.random(len(halves[0]))  # half of concept 0's images
    a[halves[1], 1] = 1.0  # the other half
    a[:, 2] = rng.random(n) * (rng.random(n) < 0.6)  # noise
    a[positives[:5], 3] = 1.0  # precise, but fires on 5 images: below min_images
    a[:, 4] = labels[:, 1] * (rng.random(n) < 0.95) + labels[:, 2] * (rng.random(n) < 0.1)  # concept 1, a little 2
    inside, outside = np.flatnonzero(labels[:, 2])[:9], np.flatnonzero(labels[:, 2] == 0)[:1]
    a[np.concatenate([inside, outside]), 5] = 1.0  # 9 of its 10 images hold concept 2: exactly the bar
    a[:, 6] = -labels[:, 1]  # negative where concept 1 is: never fires

    got = metrics.precise_features(layout(a), labels, min_precision=0.9, min_images=10)
    fires = a > 0
    for f in range(a.shape[1]):
        for c in range(labels.shape[1]):
            expected = labels[fires[:, f], c].mean() if fires[:, f].any() else 0.0
            assert got.precision[f, c] == pytest.approx(expected)
    assert list(got.eligible) == [True, True, True, False, True, True, False, False]
    assert got.precision[3, 0] == 1.0 and not got.precise[3].any()
    assert got.precise[5, 2] and got.precision[5, 2] == pytest.approx(0.9)
    assert got.precision[0, 3] >= 0.9 and not got.precise[:, 3].any()  # on 95% of images: nobody's concept
    assert [list(np.flatnonzero(got.precise[:, c])) for c in range(4)] == [[0, 1], [4], [5], []]
    assert got.split_recall[0] == 1.0 and got.split_recall[2] == pytest.approx(9 / labels[:, 2].sum())
    assert got.split_recall[1] == pytest.approx(fires[labels[:, 1] == 1, 4].mean())

    report = metrics.concept_recovery(layout(a), labels, ["shape:a", "shape:b", "colour:c", "size:d"])
    assert report.best_auroc[0] < 0.9 and not report.covered[0]  # split: no single feature suffices
    assert report.precise_fraction == pytest.approx(4 / 5)  # eligible 0, 1, 2, 4, 5; precise 0, 1, 4, 5
    table = report.to_dict()
    assert table["split_coverage"] == pytest.approx(np.mean(got.split_recall >= 0.9))
    assert table["split_coverage"] == pytest.approx(2 / 4)  # concepts 0 and 1 (recall 1.0 and ~0.95)
    assert table["concepts"][0]["precise_features"] == 2 and table["concepts"][0]["split_recall"] == 1.0
    assert table["precise_min_images"] == 10 and table["mono_precision"] == 0.9
