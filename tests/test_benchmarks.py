"""The GPU benchmarks' machinery, on CPU: the simulated-global-batch training step runs with both
losses, the loss benchmark's bf16 path runs both, and the fit table reads the right expansions off
measured peaks."""

from __future__ import annotations

import pytest

from benchmarks import fit_table, loss_memory, train_step_gpu


def test_fit_table_finds_the_largest_expansion_on_the_line():
    intercept, slope = fit_table.line_fit([(72, 10.0 + 72 * 0.25), (128, 10.0 + 128 * 0.25)])
    assert intercept == pytest.approx(10.0) and slope == pytest.approx(0.25)
    # 10 + 0.25 e <= 80 - 2  ->  e <= 272: beyond the measured x128, so a forecast
    assert fit_table.largest_expansion([(72, 28.0), (128, 42.0)], [], 80) == "x272 (forecast)"
    assert fit_table.largest_expansion([(72, 28.0), (128, 42.0)], [], 40) == "x112"
    assert fit_table.largest_expansion([(72, 28.0), (128, 42.0)], [200], 80) == "x199 (forecast)"
    assert fit_table.largest_expansion([(72, 28.0), (128, 42.0)], [], 80, dense_gib=79.0) == (
        "none (the dense step alone needs 79 GiB)")
    assert fit_table.largest_expansion([(72, 28.0), (128, 42.0)], [], 10) == "none"  # 10 GiB dense + margin
    assert fit_table.largest_expansion([(72, 10.0), (128, 10.1)], [], 80) == "> x512 (forecast)"
    assert fit_table.largest_expansion([(72, 10.0), (128, 10.0)], [], 80) == "> x512 (forecast)"  # flat
    assert fit_table.largest_expansion([(72, 10.1), (128, 10.0)], [256], 80) == "x255"  # falling, then OOM

@pytest.mark.integration
def test_simulated_global_step_runs_both_losses_on_cpu():
    result = train_step_gpu.main(["--cpu-smoke", "--losses", "clip,tiled", "--expansions", "0,8",
                                  "--batch", "128", "--global-batch", "512"])
    rows = {(r["expansion"], r["loss"]): r for r in result["rows"]}
    assert set(rows) == {(0, "clip"), (0, "tiled"), (8, "clip"), (8, "tiled")}
    assert all(r["status"] == "ok" and r["workers"] == 4 and r["samples_per_s"] > 0 for r in rows.values())
    assert rows[(8, "clip")]["width"] == 8 * rows[(0, "clip")]["width"]
    assert rows[(8, "tiled")]["throughput_vs_dense"] > 0


@pytest.mark.integration
def test_loss_benchmark_runs_both_losses_under_bf16_autocast_on_cpu(tmp_path, monkeypatch):
    """`bash benchmarks/gpu.sh loss` (bf16 on CUDA), dry-run on CPU at a small shape: each loss in its
    own child process, both fit, and the tiled value equals open_clip's to bf16 tolerance."""
    monkeypatch.setattr(loss_memory, "RESULTS", tmp_path)
    result = loss_memory.main(["--device", "cpu", "--precision", "bf16", "--global-batch", "256",
                               "--local-batch", "64", "--base", "16", "--expansions", "4", "--repeats", "1"])
    rows = {r["loss"]: r for r in result["rows"]}
    assert set(rows) == {"clip", "tiled"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["tiled"]["workers"] == 4 and rows["tiled"]["width"] == 64
    assert rows["tiled"]["value_diff"] <= 2 ** -5 * abs(rows["clip"]["value"])
    assert (tmp_path / "loss_memory_cpu_full_bf16.json").is_file()


def test_sparsity_tradeoff_overrides_are_read_as_dvc_reads_them():
    from benchmarks.sparsity_tradeoff import parse_overrides

    got = parse_overrides(["sample.source.kind=csv", "train.model.head_bias_init=null", "train.epochs=3",
                           "sample.out_dir=data/flickr8k"])
    assert got == {"sample.source.kind": "csv", "train.model.head_bias_init": None, "train.epochs": 3,
                   "sample.out_dir": "data/flickr8k"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])


def test_the_linear_probe_reads_a_family_the_embedding_holds_and_not_one_it_lacks():
    """benchmarks/linear_probe.py: embeddings that encode the main shape are probed near 1, noise
    near chance (8 shapes), so the probe tells the image side's content from the text side's."""
    import numpy as np

    from benchmarks.linear_probe import probe
    from pipeline.data.concepts import SHAPES

    rng = np.random.default_rng(0)

    def split(n: int, informative: bool):
        shapes = rng.integers(len(SHAPES), size=n)
        rows = rng.normal(size=(n, 16)) + (np.eye(len(SHAPES), 16)[shapes] * 4 if informative else 0)
        metas = [{"truth": {"main": 0, "objects": [{"shape": SHAPES[s]}]}} for s in shapes]
        return rows, metas

    assert probe(split(400, True), split(200, True), "shape") > 0.9
    assert probe(split(400, False), split(400, False), "shape") < 0.3


def test_hard_negative_batches_hold_the_pairs_they_promise():
    """Half of the batches come from one group (every row shares the key), the rest span groups;
    rows within a batch are distinct and the image and caption of a row stay paired."""
    import torch

    from benchmarks.learning_levers import hard_negative_batches

    keys = [(row % 4,) for row in range(400)]
    data = {"image": torch.arange(400).float()[:, None], "text": torch.arange(400)}
    batches = list(hard_negative_batches(keys, share=0.5)(data, 32, seed=3))
    assert len(batches) == 400 // 32
    single_group = 0
    for batch in batches:
        rows = batch["text"].tolist()
        assert len(set(rows)) == 32 and batch["image"][:, 0].long().tolist() == rows
        single_group += len({row % 4 for row in rows}) == 1
    assert 2 <= single_group <= 10  # ~half of 12; a uniform batch of 32 from 4 groups is never one group
    with pytest.raises(ValueError, match="no group"):
        next(hard_negative_batches(keys, share=0.5)(data, 128, seed=0))


def test_lever_captions_come_from_the_ground_truth():
    from benchmarks.learning_levers import canonical_caption, main_only_caption
    from pipeline.data.generator import render_record

    truth = next(r.truth for i in range(50) if len((r := render_record(i, 0)).truth["objects"]) == 2 and r.truth["word"])
    main, other = truth["objects"]
    assert main_only_caption(truth) == f"a {main['colour']} {main['shape']}"
    caption = canonical_caption(truth)
    assert caption.startswith(f"a {main['size']} {main['colour']} {main['shape']} {main['position']} with ")
    assert f"{other['colour']} {other['shape']}" in caption and caption.endswith(truth["word"]["text"])
    from benchmarks.learning_levers import position_named_caption
    from pipeline.data.generator import _POSITION_PHRASES

    assert any(phrase in position_named_caption(truth) for phrase in _POSITION_PHRASES[main["position"]])


def test_the_preset_collector_reads_the_vlm_answers_per_encoder_and_question(tmp_path):
    import json

    from benchmarks.flickr8k_preset import vlm_answers

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "vlm.json").write_text(json.dumps(
        {"sparse": {"subject.exact": 0.33, "subject.chance": 0.1, "subject.n": 96, "colour.exact": 0.9}}))
    got = vlm_answers(tmp_path, {"stage0_steps": 300, "stage1_steps": 30, "lm_cache": ".cache/lm"})
    assert got == {"settings": {"stage0_steps": 300, "stage1_steps": 30, "stage2_steps": None, "batch_size": None},
                   "sparse": {"subject": {"exact": 0.33, "chance": 0.1, "n": 96}, "colour": {"exact": 0.9}}}
    with pytest.raises(FileNotFoundError, match="run the preset first"):
        vlm_answers(tmp_path / "elsewhere", {})


def test_tagging_ceilings_label_photos_and_score_the_captioners_and_the_probe():
    import numpy as np

    from benchmarks import tagging_ceiling

    rows = [{"group": "a", "key": "a0", "caption": "A dog runs"}, {"group": "a", "key": "a1", "caption": "Two dogs"},
            {"group": "a", "key": "a2", "caption": "An animal"}, {"group": "b", "key": "b0", "caption": "A man"},
            {"group": "b", "key": "b1", "caption": "A person sits"}, {"group": "c", "key": "c0", "caption": "A dog"}]
    groups, photos, per_caption = tagging_ceiling.caption_labels(rows, ["dog", "man"])
    assert groups == ["a", "b", "c"]
    assert photos.tolist() == [[True, False], [False, True], [True, False]]
    assert per_caption[0].tolist() == [[True, False], [True, False], [False, False]]
    # "dog": captions of a (others: 1, 1, 2 say it) and b (0, 0); c has one caption and is left out.
    # Positives a0, a1 score 1; negatives a2 (2), b0 (0), b1 (0): pairs won 2 x 2 of 6, lost 2 -> 4/6.
    # "man": the positive b0 scores 0 as every negative but b1 (1): won 0, tied 3 of 4 (counted half) -> 3/8.
    assert tagging_ceiling.agreement_auroc(per_caption) == pytest.approx([4 / 6, 3 / 8])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = np.stack([x[:, 0] > 0, rng.random(400) < 0.5, np.ones(400, bool)], axis=1)
    auroc = tagging_ceiling.probe_auroc(x[:200], y[:200], x[200:], y[200:], c=1.0)
    assert auroc[0] > 0.95 and 0.35 < auroc[1] < 0.65 and np.isnan(auroc[2])


def test_the_supervised_ceiling_learns_a_family_the_pixels_show_and_scores_a_constant_at_chance():
    """benchmarks/supervised_ceiling.py: a tower that sees which half of the image is lit learns
    that label, and cannot learn one drawn independently of the pixels; chance is the commonest class."""
    import numpy as np
    import torch

    from benchmarks.linear_probe import labelled
    from benchmarks.supervised_ceiling import chance, train_family

    rng = np.random.default_rng(0)

    def split(n: int):
        side = rng.integers(2, size=n)
        images = rng.normal(scale=0.1, size=(n, 3, 8, 8)).astype(np.float32)
        for i, s in enumerate(side):
            images[i, :, :, 4 * s:4 * s + 4] += 1.0
        metas = [{"truth": {"main": 0, "objects": [{"position": ["left", "right"][s], "shape": ["circle", "square"][t]}],
                            "background": "plain", "word": None}}
                 for s, t in zip(side, rng.integers(2, size=n))]
        return images, metas

    def tower():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 8)), 8

    train, val = split(512), split(256)
    seen = train_family(tower, labelled(*train, "position"), labelled(*val, "position"), 60, 32, 1e-2, 30, 0)
    unseen = train_family(tower, labelled(*train, "shape"), labelled(*val, "shape"), 60, 32, 1e-2, 30, 0)
    assert [p["step"] for p in seen] == [30, 60]
    assert seen[-1]["accuracy"] > 0.95 and unseen[-1]["accuracy"] < 0.65
    assert labelled(*val, "word")[1] == []  # no rendered word: nothing to score
    assert chance(["a", "a", "a", "b"]) == 0.75
