"""The VLM: feature edits reach the adapter exactly, stage 1 freezes the LM, training lowers the
answer loss, QA pairs from ground truth; on a tiny Llama with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.clip.model import build_model
from pipeline.config import VLMParams, load_params
from pipeline.data.generator import render_record
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.vlm.language_model import load_language_model, prepare_language_model
from pipeline.vlm.model import (
    ASSISTANT,
    END,
    IGNORE,
    USER,
    FeatureEdit,
    VisionLanguageModel,
    edit_features,
)
from pipeline.vlm.questions import (
    QUESTIONS,
    answers_from_truth,
    normalise,
    qa_from_truth,
)
from pipeline.vlm.train import lm_trainable, two_stage_training

from .conftest import REPO
from .test_model_loss import micro


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's own tokenizer (chat tokens included), converted once."""
    _, tokenizer = load_language_model(prepare_language_model("smollm2-135m-instruct",
                                                              tmp_path_factory.mktemp("lm")))
    return tokenizer


def tiny_vlm(tokenizer, features="pooled") -> VisionLanguageModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                      tie_word_embeddings=True))
    encoder = build_model(micro(expansion=4))
    return VisionLanguageModel(encoder, lm, tokenizer, features, hidden=16)


def test_qa_pairs_from_ground_truth():
    record = render_record(5, seed=1)
    answers = answers_from_truth(record.truth)
    main = record.truth["objects"][record.truth["main"]]
    assert answers["subject"] == f"{main['colour']} {main['shape']}" and answers["colour"] == main["colour"]
    examples = qa_from_truth([{"truth": record.truth}], ["subject", "colour"])
    assert [e["question"] for e in examples] == [QUESTIONS["subject"], QUESTIONS["colour"]]
    assert normalise("A Red circle.") == "red circle"
    with pytest.raises(ValueError, match="unknown"):
        qa_from_truth([{"truth": record.truth}], ["smell"])


def test_chance_level_and_p_values_against_brute_force():
    from itertools import permutations
    from math import comb

    from pipeline.vlm.evaluate import chance_exact, p_above
    from pipeline.vlm.steering import _named_vs_random

    answers, truth = ["Red.", "red", "blue", "green"], ["red", "blue", "blue", "white"]
    shuffled = [sum(normalise(a) == t for a, t in zip(answers, order)) / 4 for order in permutations(truth)]
    assert chance_exact(answers, truth) == pytest.approx(sum(shuffled) / len(shuffled))
    assert chance_exact(["red"] * 4, truth) == pytest.approx(0.25)  # a constant answer is at chance
    assert p_above(5, 8, 0.5) == pytest.approx(sum(comb(8, i) for i in range(5, 9)) / 2**8)
    assert p_above(0, 0, 0.5) == 1.0
    paired = _named_vs_random(["blue", "blue", "red", "blue"], ["red", "blue", "blue", "red"],
                              ["blue", "blue", "blue", "red"])
    assert (paired["named_only"], paired["random_only"]) == (1, 2)
    assert paired["p_named_beats_random"] == pytest.approx(7 / 8)


def test_corruption_is_an_abnormally_long_or_empty_answer():
    from pipeline.vlm.steering import _scores, corrupted, corruption_threshold

    unedited = ["red", "blue", "dark red", "green"] * 25  # 100 answers of 1-2 words
    assert corruption_threshold(unedited, 0.99) == 2 and corruption_threshold(["a"] * 9 + ["a b c d"], 0.5) == 1
    answers = ["red", "red red red red red red", "", "dark blue"]
    assert [corrupted(a, 2) for a in answers] == [False, True, True, False]
    assert _scores(answers, ["red"] * 4, ["blue"] * 4, 2)["corruption"] == 0.5


def test_interval_of_a_rate_and_of_a_mean_against_their_closed_forms():
    from pipeline.vlm.steering import mean_interval, wilson_interval

    z = 1.959964
    for hits, n in [(0, 10), (5, 10), (9, 96)]:
        p = hits / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
            p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(np.array([True] * hits + [False] * (n - hits))) == pytest.approx(
            (centre - half, centre + half), abs=1e-6)
    values = np.array([0.2, 0.4, 0.6, 0.8])
    half = 3.182446 * values.std(ddof=1) / 2  # t(0.975, 3 degrees of freedom) x s / sqrt(4)
    assert mean_interval(values) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-6)


def test_steering_reports_corruption_when_edits_make_answers_long(monkeypatch, tmp_path):
    """The protocol end to end on a stand-in VLM whose answers run on under named edits: the
    corruption rate is measured (not 0 by construction), beside the random-edit control, and
    Fig 8b is drawn with it."""
    from types import SimpleNamespace

    from pipeline.vlm import steering

    def answer_all(vlm, images, rows, batch_size, max_new_tokens, edits=None, desc="", features=None):
        assert features == "encoded once"
        long = edits is not None and "random" not in desc and edits[0].strength > 2
        return [("red " * max_new_tokens).strip() if long and i % 2 else "red" for i in range(len(rows))]

    monkeypatch.setattr(steering, "answer_all", answer_all)
    monkeypatch.setattr(steering, "encode_images", lambda vlm, images, batch_size: "encoded once")
    monkeypatch.setattr(steering, "concept_features", lambda vlm, word, k: torch.arange(k))
    monkeypatch.setattr(steering, "sbert_similarity", lambda a, b: torch.ones(len(a)).numpy())
    labels = ["red", "blue", "green", "red"]
    result = steering.steering_evaluation(SimpleNamespace(encoder=SimpleNamespace(width=64)), torch.zeros(4, 3, 8, 8),
                                          labels, ["red", "blue", "green"], "colour?", ks=[1, 4],
                                          strengths=[2.0, 5.0], max_new_tokens=12)
    assert result["corruption_words"] == 1
    assert result["grid"]["k4_ss5"]["corruption"] == 0.5 and result["grid"]["k4_ss5"]["random.corruption"] == 0.0
    assert result["grid"]["k1_ss2"]["corruption"] == 0.0
    cell = result["grid"]["k4_ss5"]  # 2 of 4 corrupted: Wilson's interval, not the normal one's
    assert (cell["corruption_lo95"], cell["corruption_hi95"]) == pytest.approx((0.1500, 0.8500), abs=1e-4)
    assert cell["random.corruption_hi95"] == pytest.approx(0.4899, abs=1e-4)  # 0 of 4: the upper bound is not 0
    png = steering.fig8b({"colour": result, "subject": result}, tmp_path / "fig8b.png")
    assert png.is_file() and png.stat().st_size > 10_000


def test_steering_answers_must_be_allowed_to_run_long():
    from pipeline.config import ParamsError

    with pytest.raises(ParamsError, match="steer.max_new_tokens 8 must exceed vlm.max_new_tokens 8"):
        load_params(REPO / "params.yaml", overrides={"steer.max_new_tokens": 8, "vlm.max_new_tokens": 8})


def test_steering_cli_ends_bad_input_with_one_line(tmp_path, capsys):
    from pipeline.vlm.steering import main

    (tmp_path / "notes.txt").write_text("not an image")
    for argv, expected in [([str(tmp_path / "missing.jpg")], "no image file"),
                           ([str(tmp_path / "notes.txt"), "--vlm", str(tmp_path / "novlm")], "no trained VLM in")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and expected in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_edit_features_sets_exactly_the_named_features():
    features = torch.rand(2, 3, 10) + 0.1
    edit = FeatureEdit(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]]), strength=2.5)
    out = edit_features(features, edit)
    for b, (suppressed, boosted) in enumerate([([1, 2], [5, 6]), ([3, 4], [7, 8])]):
        assert (out[b, :, suppressed] == 0).all() and (out[b, :, boosted] == 2.5).all()
        untouched = [f for f in range(10) if f not in suppressed + boosted]
        assert torch.equal(out[b, :, untouched], features[b, :, untouched])
    assert torch.equal(edit_features(features, None), features)


@pytest.mark.parametrize("features", ["pooled", "tokens"])
def test_the_adapter_sees_the_edited_features(tokenizer, features):
    vlm = tiny_vlm(tokenizer, features)
    seen = []
    vlm.adapter.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    images = torch.randn(2, 3, 32, 32)
    original = vlm.sparse_features(images)
    edit = FeatureEdit(torch.tensor([[0, 1]] * 2), torch.tensor([[5, 9]] * 2), strength=3.0)
    answers = vlm.answer(images, [QUESTIONS["colour"]] * 2, edit, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    adapter_input = seen[0]
    assert (adapter_input[..., [0, 1]] == 0).all() and (adapter_input[..., [5, 9]] == 3.0).all()
    rest = [f for f in range(vlm.encoder.width) if f not in (0, 1, 5, 9)]
    assert torch.equal(adapter_input[..., rest], original[..., rest])
    assert adapter_input.shape[1] == (16 if features == "tokens" else 1)


def _data(n=12):
    pre = ClipBatchPreprocessor(32, 8)
    records = [render_record(i, seed=2) for i in range(n)]
    images = torch.from_numpy(pre({"jpg": [r.jpeg for r in records], "txt": [r.caption for r in records]})["image"])
    return images, qa_from_truth([{"truth": r.truth} for r in records], ["colour", "subject"])


def test_stage_one_trains_the_adapter_and_leaves_the_lm_unchanged(tokenizer):
    vlm = tiny_vlm(tokenizer)
    images, examples = _data()
    lm_before = {k: v.clone() for k, v in vlm.lm.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in vlm.adapter.state_dict().items()}
    cfg = VLMParams(stage1_steps=3, stage2_steps=0, batch_size=4)
    two_stage_training(vlm, images, examples, cfg, seed=0)
    assert all(torch.equal(v, lm_before[k]) for k, v in vlm.lm.state_dict().items())
    assert not all(torch.equal(v, adapter_before[k]) for k, v in vlm.adapter.state_dict().items())

    cfg = VLMParams(stage1_steps=0, stage2_steps=3, batch_size=4, lm_layers=1)
    two_stage_training(vlm, images, examples, cfg, seed=0)
    trained = {id(p) for p in lm_trainable(vlm, 1)}
    for name, p in vlm.lm.named_parameters():
        changed = not torch.equal(p, lm_before[name])
        assert changed == (id(p) in trained), name  # stage 2: exactly the top block (+ final norm) moves


def test_the_pipeline_tunes_the_whole_lm_in_stage_two(tokenizer):
    """Paper §4: stage 2 fine-tunes "the adapter and LLM together": params.yaml's default moves every
    LM parameter, the tied embeddings included."""
    cfg = load_params(REPO / "params.yaml").vlm
    assert cfg.lm_layers is None
    vlm = tiny_vlm(tokenizer)
    images, examples = _data()
    before = {k: v.clone() for k, v in vlm.lm.state_dict().items()}
    two_stage_training(vlm, images, examples, cfg.model_copy(update={"stage1_steps": 0, "stage2_steps": 2,
                                                                      "batch_size": 4}), seed=0)
    assert [k for k, v in vlm.lm.state_dict().items() if torch.equal(v, before[k])] == []


def test_a_batch_is_embedded_in_one_lookup_with_the_per_piece_values(tokenizer):
    """One embedding call per batch (each call's backward is a dense vocabulary-sized gradient when
    the LM trains), giving exactly the embeddings of the prompt pieces looked up one by one."""
    vlm = tiny_vlm(tokenizer)
    images, examples = _data(3)
    questions, answers = [e["question"] for e in examples], [e["answer"] for e in examples]
    visual = vlm.visual_tokens(images[[e["image"] for e in examples]])
    calls = []
    hook = vlm.lm.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    rows = vlm.sequences(visual, questions, answers)
    hook.remove()
    assert len(calls) == 1
    for i, (embeds, labels) in enumerate(rows):
        prompt = vlm._ids(f"{questions[i]}{END}\n{ASSISTANT}")
        answer = vlm._ids(answers[i]) + [vlm.end_id]
        expected = torch.cat([vlm._embed_ids(vlm._ids(USER)), visual[i], vlm._embed_ids(prompt),
                              vlm._embed_ids(answer)])
        assert torch.equal(embeds, expected)
        assert labels[-len(answer):].tolist() == answer and (labels[:-len(answer)] == IGNORE).all()
    unanswered = vlm.sequences(visual, questions)
    assert all(len(e) == len(r[0]) - len(vlm._ids(a)) - 1 for (e, _), r, a in zip(unanswered, rows, answers))


def test_training_lowers_the_answer_loss(tokenizer):
    vlm = tiny_vlm(tokenizer)
    images, examples = _data(8)
    cfg = VLMParams(stage1_steps=0, stage2_steps=0)
    with torch.no_grad():
        before = vlm.loss(images[[e["image"] for e in examples]], [e["question"] for e in examples],
                          [e["answer"] for e in examples]).item()
    two_stage_training(vlm, images, examples, cfg.model_copy(update={"stage1_steps": 15, "stage2_steps": 15,
                                                                      "batch_size": 8, "lm_layers": None,
                                                                      "stage2_lr": 3e-3}), seed=0)
    with torch.no_grad():
        after = vlm.loss(images[[e["image"] for e in examples]], [e["question"] for e in examples],
                         [e["answer"] for e in examples]).item()
    assert after < before - 1.0, (before, after)  # more than a nat lower on the answers it trained on


def test_ray_train_vlm_on_two_workers_and_steering_api(extracted, ray_local, workdir):
    """The real path: SmolLM2 on a trained-model folder, 2 Ray Train workers (gradients
    all-reduced), weights exported, reloaded, answering, and the steering API on one image."""
    from pipeline.data.shards import read_split
    from pipeline.vlm.evaluate import answer_all, encode_images, qa_metrics
    from pipeline.vlm.steering import Steerer
    from pipeline.vlm.train import load_vlm, qa_examples, run_vlm_training


    root, _, _ = extracted
    params = load_params(REPO / "params.yaml", overrides={
        "sample.out_dir": str(root / "data"), "train.out_dir": str(root / "models"),
        "train.variants": {"sparse": {}, "dense": {"expansion": 0, "activation": "none"}},
        "sae.source_variant": "dense", "atlas.variants": ["sparse"], "atlas.heatmap_models": [],
        "vlm.variants": ["sparse"], "steer.variant": "sparse",
        "vlm.stage1_steps": 2, "vlm.stage2_steps": 2, "vlm.batch_size": 4, "vlm.num_workers": 2,
        "vlm.threads_per_worker": 1, "vlm.lm_layers": 1, "vlm.lm_cache": str(REPO / ".cache" / "lm"),
        "vlm.out_dir": str(workdir / "vlm"), "ray.storage_path": str(workdir / "ray_results"),
    })
    out = run_vlm_training(params, "sparse")
    assert {p.name for p in out.iterdir()} >= {"adapter.pt", "lm_trained.pt", "vlm.json"}
    assert not any((workdir / "ray_results").glob("vlm-*")), "Ray's checkpoints outlived the export"
    spec = json.loads((out / "vlm.json").read_text())  # stored relative to the VLM: a moved project loads its own
    assert not any(Path(spec[key]).is_absolute() for key in ("encoder_dir", "lm_dir"))
    vlm = load_vlm(out)
    saved = torch.load(out / "adapter.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in vlm.adapter.state_dict().items())
    assert set(torch.load(out / "lm_trained.pt", weights_only=True)) == {
        n for n, p in vlm.lm.named_parameters() if id(p) in {id(q) for q in lm_trainable(vlm, 1)}}
    images, examples, _ = qa_examples(params.sample.out_dir, "test", params.vlm, ClipBatchPreprocessor(
        vlm.encoder.image_size, vlm.encoder.context_length), limit=4)
    answers = answer_all(vlm, images, examples[:8], batch_size=8, max_new_tokens=3)
    encoded = encode_images(vlm, images, batch_size=3)  # once, as steering does: the same answers
    assert encoded.shape == (len(images), 1, vlm.encoder.width)
    assert answer_all(vlm, images, examples[:8], batch_size=8, max_new_tokens=3, features=encoded) == answers
    scores = qa_metrics(answers, examples[:8])
    assert all(0 <= v <= 1 for k, v in scores.items() if k.endswith((".exact", "_named")))
    jpeg = next(read_split(params.sample.out_dir, "test")).jpeg
    steerer = Steerer(vlm)
    edit = steerer.edit(["red"], ["blue"], k=3, strength=4.0)
    assert edit.suppress.shape == edit.boost.shape == (1, 3)
    assert isinstance(steerer(jpeg, suppress=["red"], boost=["blue"], k=3, strength=4.0, max_new_tokens=3), str)


@pytest.mark.slow
def test_on_embedded_data_the_vlm_answers_above_chance_and_named_boosts_beat_random_edits(workdir, ray_local):
    """The issue's claim, measured end to end on the embedded data at reduced size: a Sparse CLIP
    trained by Ray Train (60 steps), a SmolLM2 VLM trained on the subject and colour questions
    (40 + 40 steps), then 96 held-out images. The subject's exact match must beat its chance level
    (the same answers given to the images in random order) by a one-sided binomial test, p < 0.01,
    and so must the colour's (p < 0.001); suppressing the true colour's top-64 text features and boosting another colour's must turn
    answers to the boosted colour on more images than random edits of the same size do, by a
    paired sign test, p < 0.001. Measured here: subject 9 of 96 right against 1.7 by chance
    (p = 5e-5); the boosted colour on 23 of 96 images against 5 with random edits (18 images flip
    only under the named edit, none only under the random one: p = 4e-6)."""
    from pipeline.clip.train import run_training
    from pipeline.config import RayParams
    from pipeline.data.sampling import run_sample
    from pipeline.vlm.evaluate import answer_all, qa_metrics
    from pipeline.vlm.steering import steering_evaluation
    from pipeline.vlm.train import build_vlm, qa_examples

    params = load_params(REPO / "params.yaml", overrides={
        "sample.source.generator.num_records": 2400, "sample.out_dir": str(workdir / "data"),
        "train.variants": {"sparse": {"logit_scale_cap": 50}}, "train.epochs": 4,
        "train.out_dir": str(workdir / "models"), "ray.storage_path": str(workdir / "ray_results"),
        "sae.source_variant": "sparse", "vlm.variants": ["sparse"], "steer.variant": "sparse",
        "vlm.question_types": ["subject", "colour"],
        "vlm.stage1_steps": 40, "vlm.stage2_steps": 40,
        # the setting this test's thresholds were measured in: 60 steps of 128, the paper's recipe
        "train.global_batch_size": 128, "sample.splits": {"train": 0.8, "val": 0.1, "test": 0.1},
        "train.num_workers": 1,  # one worker reads every row: the run is the same on every machine
        "train.model.head_bias_init": None, "train.optim.head_lr_multiplier": 1.0,
        "vlm.lm_layers": 4,  # stage 2 on the LM's top 4 blocks: at this scale it answers better than the
    })                       # whole LM (docs/findings.md, benchmarks/vlm_stage2.py)
    run_sample(params.sample, RayParams(num_cpus=2))
    encoder_dir = run_training(params, "sparse").model_dir
    torch.manual_seed(0)
    vlm = build_vlm(encoder_dir, prepare_language_model(params.vlm.language_model, REPO / ".cache" / "lm"),
                    params.vlm)
    preprocessor = ClipBatchPreprocessor(vlm.encoder.image_size, vlm.encoder.context_length)
    images, examples, _ = qa_examples(params.sample.out_dir, "train", params.vlm, preprocessor)
    two_stage_training(vlm, images, examples, params.vlm, seed=0)
    vlm.eval()

    images, examples, metas = qa_examples(params.sample.out_dir, "test", params.vlm, preprocessor, limit=96)
    scores = qa_metrics(answer_all(vlm, images, examples, batch_size=32, max_new_tokens=8), examples)
    assert scores["subject.n"] == 96
    assert scores["subject.exact"] > 2 * scores["subject.chance"], scores
    assert scores["subject.p_above_chance"] < 1e-2, scores
    assert scores["colour.p_above_chance"] < 1e-3, scores

    labels = [answers_from_truth(m["truth"])["colour"] for m in metas]
    result = steering_evaluation(vlm, images, labels, sorted(set(labels)), QUESTIONS["colour"], ks=[64],
                                 strengths=[5.0], seed=0, max_new_tokens=8)  # as the thresholds were measured
    grid = result["grid"]["k64_ss5"]
    print({k: v for k, v in scores.items() if k.startswith("subject")}, {k: v for k, v in grid.items()
                                                                         if k != "examples"})  # shown with -s
    assert grid["boosted_rate"] > grid["random.boosted_rate"], grid
    assert grid["sim_boosted"] > grid["random.sim_boosted"], grid
    assert grid["p_named_beats_random"] < 1e-3, grid


def test_answer_balance_evens_out_each_question_types_answers_and_keeps_the_types_shares():
    """0 keeps the uniform draw; 1 draws every answer of a type equally often; the question types
    keep their shares of the draws either way (brute force over 60,000 draws)."""
    from collections import Counter

    from pipeline.vlm.train import answer_weights, draw

    examples = ([{"type": "subject", "answer": "dog"}] * 80 + [{"type": "subject", "answer": "man"}] * 15
                + [{"type": "subject", "answer": "bird"}] * 5 + [{"type": "colour", "answer": "red"}] * 50
                + [{"type": "colour", "answer": "blue"}] * 50)
    assert answer_weights(examples, 0.0) is None
    generator = torch.Generator().manual_seed(0)
    uniform = Counter(examples[i]["answer"] for i in draw(len(examples), None, 60_000, generator))
    assert uniform["dog"] / 60_000 == pytest.approx(80 / 200, abs=0.01)
    for balance, dog_share in ((1.0, 1 / 3), (0.5, 80 ** 0.5 / (80 ** 0.5 + 15 ** 0.5 + 5 ** 0.5))):
        picks = [examples[i] for i in draw(len(examples), answer_weights(examples, balance), 60_000, generator)]
        types = Counter(e["type"] for e in picks)
        assert types["subject"] / 60_000 == pytest.approx(0.5, abs=0.01)  # the types' shares as drawn uniformly
        subjects = Counter(e["answer"] for e in picks if e["type"] == "subject")
        assert subjects["dog"] / types["subject"] == pytest.approx(dog_share, abs=0.01)
        assert subjects["bird"] / types["subject"] == pytest.approx(
            1 / 3 if balance == 1 else 5 ** 0.5 / (80 ** 0.5 + 15 ** 0.5 + 5 ** 0.5), abs=0.01)


def test_stage_zero_aligns_the_adapter_with_the_answers_word_embeddings_and_leaves_the_lm(tokenizer):
    """Stage 0 moves the adapter only, toward each image's target: the mean input embedding of
    its answers' tokens (computed here independently of the code under test)."""
    from pipeline.vlm.train import align_adapter, answer_embeddings

    vlm = tiny_vlm(tokenizer)
    images, examples = _data()
    lm_before = {k: v.clone() for k, v in vlm.lm.state_dict().items()}
    features, targets = answer_embeddings(vlm, images, examples)
    embed = vlm.lm.get_input_embeddings().weight
    first = [e["answer"] for e in examples if e["image"] == 0]
    expected = torch.stack([embed[tokenizer(a, add_special_tokens=False)["input_ids"]].mean(0) for a in first]).mean(0)
    assert torch.allclose(targets[0], expected.detach(), atol=1e-6) and features.shape[:2] == (len(targets), 1)

    def error() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(vlm.adapter(features), targets[:, None, :]).item()

    before = error()
    align_adapter(vlm, images, examples, VLMParams(stage0_steps=60, stage0_lr=1e-2), torch.Generator().manual_seed(0))
    assert error() < 0.5 * before
    assert all(torch.equal(v, lm_before[k]) for k, v in vlm.lm.state_dict().items())
