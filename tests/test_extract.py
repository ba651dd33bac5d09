"""Vocabulary, sparse Parquet layout, Ray Data extraction and the metrics stage on a tiny model."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.activations.extract import run_extraction
from pipeline.activations.sparse_io import (
    activation_table,
    read_activations,
    sparse_rows,
    to_csr,
)
from pipeline.config import (
    ExtractParams,
    MetricsParams,
    VocabParams,
    load_params,
)
from pipeline.data.concepts import concept_words
from pipeline.data.loading import ClipBatchPreprocessor
from pipeline.data.shards import read_split
from pipeline.metrics.evaluate import evaluate
from pipeline.vocab import build_vocabulary, merge

from .conftest import REPO


def test_merge_lowercases_dedupes_and_keeps_first_order():
    assert merge(["Dog", "cat "], ["dog", "big  Cat", ""], ["CAT"]) == ["dog", "cat", "big cat"]


def test_builtin_vocabulary_is_offline_wordnet_plus_common_words():
    words, counts = build_vocabulary(VocabParams())
    assert counts["wordnet"] == 117659 and counts["common"] == 20000
    assert 90000 < len(words) < 120000 and len(words) == len(set(words)) == counts["vocabulary"]
    assert all(w == w.lower() for w in words[:5000])
    assert set(concept_words()) <= set(words) and "dog" in words and "entity" in words
    capped, _ = build_vocabulary(VocabParams(max_words=50))
    assert capped[: len(concept_words())] == merge(concept_words()) and len(capped) == 50


def test_vocabulary_from_a_user_file(tmp_path):
    (tmp_path / "words.txt").write_text("Zebra\nzebra\n\nstop sign\n")
    words, counts = build_vocabulary(VocabParams(source="file", path=str(tmp_path / "words.txt")))
    assert words == ["zebra", "stop sign"] and counts["vocabulary"] == 2


def test_sparse_layout_round_trips_and_grows_with_nnz(tmp_path):
    dense = torch.relu(torch.randn(50, 4096))
    indices, values = sparse_rows(dense)
    table = activation_table({"key": [f"{i:03d}" for i in range(50)]}, indices, values, 4096)
    np.testing.assert_allclose(to_csr(table).toarray(), dense.numpy(), rtol=1e-6)

    def size(keep: float) -> int:
        x = dense * (torch.rand_like(dense) < keep)
        path = tmp_path / f"{keep}.parquet"
        pq.write_table(activation_table({"key": list(range(50))}, *sparse_rows(x), 4096), path)
        return path.stat().st_size

    small, large = size(0.01), size(0.5)
    assert small * 10 < large, (small, large)  # bytes follow nnz, not the 4096 width




def test_ray_data_extraction_equals_a_direct_forward_pass(extracted):
    root, params, models = extracted
    model, manifest = models["sparse"]
    assert manifest["rows"]["images"] == 120 and manifest["rows"]["texts"] == 120
    assert manifest["rows"]["tokens"] == 4 * 16  # 4 images x (32/8)^2 tokens
    meta, acts = read_activations(root / "acts" / "sparse" / "images", manifest["width"])
    records = {r.key: r for split in ("train", "val", "test") for r in read_split(root / "data", split)}
    keys = meta.column("key").to_pylist()
    assert keys == sorted(records)
    pre = ClipBatchPreprocessor(model.image_size, model.context_length)
    images = torch.as_tensor(np.stack([pre.image(records[k].jpeg) for k in keys]))
    with torch.no_grad():
        direct = model.encode_image(images).numpy()
    np.testing.assert_allclose(acts.toarray(), direct, rtol=1e-4, atol=1e-5)
    vocab_meta, vocab = read_activations(root / "acts" / "sparse" / "vocab", manifest["width"])
    with torch.no_grad():
        word = model.encode_text(torch.as_tensor(pre.tokens([vocab_meta.column("key")[0].as_py()]))).numpy()
    np.testing.assert_allclose(vocab[0].toarray(), word, rtol=1e-4, atol=1e-5)


def test_rerun_skips_completed_sets(extracted, caplog):
    root, params, models = extracted
    before = {p: p.stat().st_mtime for p in (root / "acts" / "sparse" / "images").iterdir()}
    run_extraction(root / "models" / "sparse", root / "data", root / "vocab", root / "acts" / "sparse",
                   ExtractParams(actors=2, batch_size=16, token_sample=4,
                                 labelled_folders={"shapes": str(root / "imagenet_layout")}), 0.25, "test")
    assert before == {p: p.stat().st_mtime for p in (root / "acts" / "sparse" / "images").iterdir()}


def test_metrics_of_dense_and_sparse_models(extracted):
    root, params, models = extracted
    results = {}
    for name in ("sparse", "dense"):
        results[name] = evaluate(root / "acts" / name, root / "reference", root / "vocab", MetricsParams(),
                                 root / "plots" / name, title=name)
    dense, sparse = results["dense"], results["sparse"]
    assert dense["image"]["l0"] == dense["width"] == 16  # no ReLU: every dimension is active
    assert 0 < sparse["image"]["l0"] < sparse["width"] == 128
    assert 0 <= sparse["clarity"] <= 1 and 0 <= sparse["clarity_baseline"] <= 1
    for task in ("shape", "colour"):
        assert 0 <= sparse["zeroshot"][task]["top1"] <= sparse["zeroshot"][task]["top5"] <= 1
        for cut in ("labels_topk", "images_topk"):
            assert set(sparse["zeroshot"][task][cut]) == {f"top1_at_{k}" for k in (1, 2, 4, 8, 16, 32)}
    folder_classes = sorted(p.name for p in (root / "imagenet_layout").iterdir())
    assert models["sparse"][1]["zero_shot_tasks"]["shapes"]["classes"] == folder_classes
    assert sparse["zeroshot"]["shapes"]["n"] == 12
    assert set(sparse["retrieval"]) == {f"{d}_retrieval_r{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert 0.5 <= sparse["recovery"]["mean_best_auroc"] <= 1
    assert abs(sparse["modality"]["image_only"] + sparse["modality"]["text_only"]
               + sparse["modality"]["multimodal"] - 1) < 1e-9
    for png in ("modality.png", "topk.png", "cscore.png"):
        assert (root / "plots" / "sparse" / png).stat().st_size > 1000
    for result in (dense, sparse):  # beyond zero-shot, dense and sparse alike
        assert {"shape", "colour"} <= set(result["probe"])
        assert all(0 <= p["accuracy"] <= 1 and 0 < p["chance"] <= 1 for p in result["probe"].values())
        assert 0 <= result["segmentation_probe"]["auroc"] <= 1
        assert result["segmentation_probe"]["tokens_per_image"] == (32 // 8) ** 2  # the micro ViT's patch grid


def test_sae_baselines_on_the_dense_model(extracted, workdir):
    """The three SAEs train on the dense model's inputs (extracted by Ray Data in one run) and are
    measured by the same metric code as the sparse models: the image SAE without a modality score
    (it saw images only), the multimodal SAE with one, the residual-token SAE on every token."""
    from pipeline.activations.inputs import image_rows
    from pipeline.sae.baseline import (
        read_dense,
        run_sae_baseline,
        stream_dense,
        training_curves,
    )

    root, _, models = extracted
    params = load_params(REPO / "params.yaml", overrides={
        "sample.out_dir": str(root / "data"), "train.out_dir": str(root / "models"),
        "extract.out_dir": str(root / "acts"), "reference.out_dir": str(root / "reference"),
        "vocab.out_dir": str(root / "vocab"), "sae.out_dir": str(workdir / "sae"),
        "sae.expansion": 4, "sae.k": 4, "sae.epochs": 5, "sae.batch_size": 32, "sae.aux_k": 8,
        "sae.train_splits": ["train"], "extract.actors": 2,
        "sae.multimodal": True, "sae.residual_layer": 0, "sae.tokens_per_image": 3, "sae.cls_layer": -1,
    })
    result, histories = run_sae_baseline(params, workdir / "plots")
    assert result["width"] == 4 * models["dense"][1]["width"]
    history = histories["image"]
    assert history and history[-1]["l0"] == pytest.approx(4, abs=1e-6)  # BatchTopK: exactly k per row on average
    assert 0 <= result["reconstruction"]["all.fvu"] < 1.5 and -1 <= result["reconstruction"]["all.cosine"] <= 1
    assert 0 < result["image"]["l0"] <= result["width"]
    assert 0 <= result["clarity"] <= 1 and "recovery" in result
    assert "modality" not in result  # image-only by construction, not scored on text
    for task in ("shape", "colour"):
        zs = result["zeroshot_reconstruction"][task]
        assert 0 <= zs["sae_reconstruction"]["top1"] <= 1 and 0 <= zs["dense"]["top1"] <= 1
    assert (workdir / "sae" / "sae.pt").is_file()

    multimodal = result["multimodal"]
    assert abs(sum(multimodal["modality"][k] for k in ("image_only", "text_only", "multimodal")) - 1) < 1e-9
    assert multimodal["reconstruction"]["all.n"] == 2 * 120  # the extracted images and their captions
    assert (workdir / "sae" / "multimodal" / "images").is_dir()

    residual = result["residual"]
    grid = (32 // 8) ** 2 + 1  # the micro ViT's tokens, CLS included
    n_train, n_eval = (len(image_rows(root / "data", s)) for s in (["train"], ["test"]))
    assert residual["layer"] == 0 and residual["d_in"] == 32
    assert residual["train_rows"] == n_train * (3 + 1)  # 3 patches + CLS per training image
    assert residual["reconstruction"]["all.n"] == n_eval * grid and residual["reconstruction"]["outlier.n"] >= 1
    assert 0 <= residual["reconstruction"]["all.fvu"] < 1.5
    assert histories["multimodal"][-1]["step"] == histories["residual"][-1]["step"] == history[-1]["step"]

    cls = result["cls"]  # Prisma's cls@11 of 12: the CLS token after the last-but-one block, scored as a variant
    n_measured = len(image_rows(root / "data", params.extract.splits))
    assert cls["layer"] == 0 and cls["d_in"] == 32  # the micro ViT has 1 block: -1 is block 0
    assert cls["reconstruction"]["all.n"] == n_measured and 0 <= cls["reconstruction"]["all.fvu"] < 1.5
    assert cls["width"] == result["width"] and 0 < cls["image"]["l0"] <= cls["width"]  # the image SAE's width
    assert 0 <= cls["clarity"] <= 1 and "recovery" in cls
    assert not {"text", "modality", "retrieval", "cscore"} & set(cls)  # no text side to score
    curves = training_curves(histories)
    assert {"fvu", "multimodal.fvu", "residual.fvu"} <= set().union(*curves.values())

    width, inputs = models["dense"][1]["width"], workdir / "sae" / "train_inputs"
    cached, streamed = read_dense([inputs], width), torch.cat(list(stream_dense([inputs], width)()))
    assert cached.shape == streamed.shape and cached.shape[0] > 0  # the cached read = Ray Data's stream
    assert sorted(map(tuple, cached.tolist())) == sorted(map(tuple, streamed.tolist()))
    texts = workdir / "sae" / "train_texts"
    both = torch.cat(list(stream_dense([inputs, texts], width)()))
    assert both.shape[0] == cached.shape[0] + read_dense([texts], width).shape[0]


def test_residual_rows_are_the_blocks_output_at_a_per_key_draw_of_tokens(tmp_path):
    """The token SAE's inputs: the residual stream after a block (= a forward hook there), CLS plus
    ``tokens_per_image`` distinct patches per image, the same draw for the same key on any actor."""
    import io

    from PIL import Image

    from pipeline.activations.extract import SparseEncoder
    from pipeline.activations.inputs import INPUT_COLUMNS, TAGS
    from pipeline.clip.model import build_model, save_model

    from .test_model_loss import MICRO

    tiny = {**MICRO, "vision_cfg": {**MICRO["vision_cfg"], "layers": 2}, "text_cfg": {**MICRO["text_cfg"], "vocab_size": 49408}}
    params = load_params(REPO / "params.yaml")
    torch.manual_seed(0)
    model = build_model(params.train.model.model_copy(update={"inline": tiny, "expansion": 0, "activation": "none"}))
    save_model(model.eval(), tmp_path / "dense")
    images = torch.randn(2, 3, 32, 32)
    hooked = {}
    model.clip.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: hooked.__setitem__("x", o))
    model.encode_image(images)
    torch.testing.assert_close(model.residual_tokens(images, 0), hooked["x"])
    with pytest.raises(ValueError, match="vision block 2: the vision tower has blocks 0..1"):
        model.residual_tokens(images, 2)
    torch.testing.assert_close(model.residual_tokens(images, -2), hooked["x"])  # from the end: the last but one

    encoder = SparseEncoder(str(tmp_path / "dense"),
                            residual={"layer": 1, "tokens_per_image": 3, "include_cls": True, "seed": 0})
    picks = encoder._token_picks("residual", ["a", "b", "a"], 17)
    assert picks[0] == picks[2] != picks[1]
    assert all(p[0] == 0 and len(set(p)) == 4 and all(1 <= t < 17 for t in p[1:]) for p in picks)
    assert encoder._token_picks("residual_all", ["a"], 17) == [list(range(17))]

    jpegs = []
    for seed in (1, 2):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    batch = {c: np.asarray(["x", "y"] if c == "key" else jpegs if c == "jpg" else ["", ""], dtype=object)
             for c in INPUT_COLUMNS + TAGS}
    batch["kind"], batch["checkpoint"] = np.asarray(["residual"] * 2, dtype=object), np.asarray(["final"] * 2, dtype=object)
    table = encoder(batch)
    assert table.column("key").to_pylist() == ["x"] * 4 + ["y"] * 4
    tokens = table.column("token").to_pylist()
    pixels = torch.as_tensor(np.stack([encoder.preprocess.image(j) for j in jpegs]))
    stream = model.residual_tokens(pixels, 1)
    expected = torch.stack([stream[i // 4, t] for i, t in enumerate(tokens)]).numpy()
    np.testing.assert_allclose(to_csr(table, 32).toarray(), expected, rtol=1e-5, atol=1e-6)

    cls_encoder = SparseEncoder(str(tmp_path / "dense"), residual={"cls_layer": -2})
    batch["kind"] = np.asarray(["residual_cls"] * 2, dtype=object)
    batch["meta"] = np.asarray(['{"a": 1}', '{"a": 2}'], dtype=object)
    table = cls_encoder(batch)  # one row per image, its meta kept: the CLS token after block 0 (of 2)
    assert table.column("key").to_pylist() == ["x", "y"] and table.column("meta").to_pylist() == ['{"a": 1}', '{"a": 2}']
    np.testing.assert_allclose(to_csr(table, 32).toarray(), model.residual_tokens(pixels, 0)[:, 0].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_topk_cuts_of_labels_and_of_images_against_brute_force():
    """Supplementary Fig 2 both ways: the class labels' top-k features (the supplementary's cut)
    or each image's, scored by cosine similarity; checked against dense numpy."""
    import scipy.sparse as sp

    from pipeline.metrics.registry import topk_cut_scores

    rng = np.random.default_rng(0)
    images = np.maximum(rng.normal(size=(20, 12)), 0)
    classifier = np.maximum(rng.normal(size=(3, 12)), 0)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)

    def cut(rows, k):
        out = np.zeros_like(rows)
        for i, row in enumerate(rows):
            top = np.argsort(-row, kind="stable")[:k]
            out[i, top] = row[top]
        return out

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for k in (1, 3, 12):
        np.testing.assert_allclose(topk_cut_scores("labels_topk", sp.csr_matrix(images), classifier, k),
                                   unit(images) @ unit(cut(classifier, k)).T, rtol=1e-10)
        np.testing.assert_allclose(topk_cut_scores("images_topk", sp.csr_matrix(images), classifier, k),
                                   unit(cut(images, k)) @ classifier.T, rtol=1e-10)
    assert not np.allclose(topk_cut_scores("labels_topk", images, classifier, 1),
                           topk_cut_scores("images_topk", images, classifier, 1))  # two different cuts


def test_preset_collector_compares_each_model_with_dense_on_the_same_queries(extracted):
    from benchmarks.flickr8k_preset import retrieval_against_dense
    from pipeline.activations.store import ActivationSet
    from pipeline.metrics.evaluate import retrieval_metrics

    root, _, _ = extracted
    got = retrieval_against_dense(root / "acts", ["dense", "sparse"], ks=(1, 5))
    recall = {name: retrieval_metrics(*ActivationSet(root / "acts" / name).load("images"),
                                      *ActivationSet(root / "acts" / name).load("texts"))
              for name in ("dense", "sparse")}
    assert set(got) == {"sparse"}
    for key, row in got["sparse"].items():
        assert row["difference"] == pytest.approx(recall["sparse"][key] - recall["dense"][key])
        assert row["ci95_low"] <= row["ci95_high"]
    assert got["sparse"]["text_retrieval_r5"]["queries"] == got["sparse"]["text_retrieval_r5"]["photos"]
