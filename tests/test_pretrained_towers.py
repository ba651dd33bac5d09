"""Pretrained towers (EfficientNet-lite + MiniLM through open_clip), locking, and the feature cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.model import build_model, load_model, save_model
from pipeline.clip.towers import image_weights_file, load_image_weights
from pipeline.clip.recipe import RecipeStep, make_optimizer
from pipeline.config import ModelParams, OptimParams, load_params
from pipeline.data.loading import ClipBatchPreprocessor

from .conftest import REPO

IMAGE = 64  # EfficientNet-lite is convolutional: a small input keeps these tests fast


def pretrained(lock: dict | None = None, **overrides) -> ModelParams:
    return ModelParams.model_validate({
        "inline": {"embed_dim": 16, "vision_cfg": {}, "text_cfg": {}}, "expansion": 4,
        "towers": {"image": "efficientnet-lite0", "text": "all-minilm-l6-v2", "image_size": IMAGE, "context_length": 12},
        "lock": lock or {"image": True, "text": True}, **overrides})


def inputs(model, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    captions = ["a dog runs on the grass", "two men sit on a bench", "a red car", "children play in water"]
    texts = torch.as_tensor(ClipBatchPreprocessor.for_model(model).tokens((captions * n)[:n]))
    return images, texts


@pytest.fixture(scope="module")
def locked():
    torch.manual_seed(0)
    return build_model(pretrained())


def test_mapped_efficientnet_weights_give_the_reference_logits():
    """The packaged EfficientNet-PyTorch weights, mapped in order onto timm's tf_efficientnet_lite0,
    give the package's own model's ImageNet logits on a fixed input."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(image_weights_file("efficientnet-lite0")))
    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_image_weights(trunk, "efficientnet-lite0")
    state = torch.load(image_weights_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    trunk.classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference.eval()(x), trunk.eval()(x)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert (expected.argmax(1) == got.argmax(1)).all()


def test_frozen_batch_norm_keeps_timms_fused_activation(locked):
    """open_clip's BN freeze turns timm's BatchNormAct2d into a plain FrozenBatchNorm2d and drops
    the activation; the lock here keeps it: a locked tower computes what the unlocked one does."""
    torch.manual_seed(0)
    free = build_model(pretrained(lock={}))
    images, _ = inputs(locked)
    with torch.no_grad():
        a = free.eval().clip.visual.trunk.forward_features(images)
        b = locked.eval().clip.visual.trunk.forward_features(images)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_a_locked_tower_does_not_move_in_a_step_nor_do_its_batch_norm_stats():
    torch.manual_seed(0)
    model = build_model(pretrained()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = OptimParams(lr=1e-2, warmup_steps=0)
    step = RecipeStep(model, make_optimizer(model, optim), SparseClipObjective(model.params), optim, total=3)
    images, texts = inputs(model)
    for i in range(2):
        step({"image": images, "text": texts}, i)
    after = model.state_dict()
    towers = [k for k in before if k.startswith(("clip.visual.trunk.", "clip.text.transformer."))]
    assert any("running_mean" in k for k in towers)
    assert all(torch.equal(before[k], after[k]) for k in towers)
    trained = ["clip.visual.head.proj.weight", "clip.text.proj.weight", "image_head.linear.weight",
               "text_head.linear.weight"]
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_text_tower_locks_all_but_its_last_layers():
    """open_clip's HFTextEncoder.lock(unlocked_layers > 0) raises KeyError 'layer_attr' on BERT as
    shipped; the patched names lock the embeddings and the first layers only."""
    model = build_model(pretrained(lock={"text": True, "text_unlocked_layers": 1}))
    grads = {n: p.requires_grad for n, p in model.clip.text.transformer.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith(("embeddings.", "encoder.layer.0.")))
    assert all(v for n, v in grads.items() if n.startswith("encoder.layer.5.") and "LayerNorm" not in n)
    assert model.cacheable_towers() == ["text"] and model.text_cache_layer == 5  # its input is cached
    thawed_norms = build_model(pretrained(lock={"text": True, "text_unlocked_layers": 1, "text_freeze_layer_norm": False}))
    assert thawed_norms.cacheable_towers() == []  # locked layers whose norms train are not a fixed function


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_the_text_tower_resumes_from_a_layers_input_padded_or_not(locked, layer):
    """What the cache stores for a text tower unlocked from ``layer`` on, run through the layers
    from there, is the tower's output; zero padding (mask 0), as the cache pads, changes nothing."""
    from pipeline.clip.towers import text_from_layer, text_layer_inputs

    text = locked.eval().clip.text
    _, tokens = inputs(locked)
    mask = (tokens != text.config.pad_token_id).long()
    with torch.no_grad():
        expected = text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)
        rows = text_layer_inputs(text, tokens, layer)
        padded = torch.cat([rows, torch.zeros(rows.shape[0], 5, rows.shape[2])], dim=1)
        assert torch.allclose(text_from_layer(text, rows, layer), expected, atol=1e-5)
        assert torch.allclose(text_from_layer(text, padded, layer), expected, atol=1e-5)


def test_image_units_are_the_trunks_forward_features_split_where_the_lock_splits_it(locked):
    """The flat units run as timm's forward_features does; a tower locked but for its last N groups
    first trains at unit -2 - N (timm's groups: the stem, then each block, the last block with the
    head convolution and its norm)."""
    from pipeline.clip.towers import image_units, run_image_units

    trunk = locked.eval().clip.visual.trunk
    images, _ = inputs(locked)
    with torch.no_grad():
        assert torch.equal(run_image_units(trunk, images, 0), trunk.forward_features(images))
    units = len(image_units(trunk))
    assert locked.image_cache_unit is None  # fully locked: the pooled map is cached
    assert build_model(pretrained(lock={})).image_cache_unit is None  # nothing locked: nothing cached
    for groups in (1, 2, 3):
        model = build_model(pretrained(lock={"image": True, "image_unlocked_groups": groups, "text": True}))
        assert model.image_cache_unit == units - 2 - groups
        assert model.cacheable_towers() == ["image", "text"]
        trainable = [i for i, unit in enumerate(image_units(model.clip.visual.trunk))
                     if any(p.requires_grad for p in unit.parameters())]
        assert trainable == list(range(units - 2 - groups, units))


@pytest.mark.parametrize("lock, pooling", [({"image": True, "text": True}, "cls"),
                                           ({"image": True, "text": True, "text_unlocked_layers": 2}, "cls"),
                                           ({"image": True, "image_unlocked_groups": 2, "text": True}, "cls"),
                                           ({"image": True, "image_unlocked_groups": 1, "text": True}, "avg")],
                         ids=["locked", "last-two-text-layers-train", "last-two-image-groups-train",
                              "sparse-avg-last-image-group-trains"])
def test_a_step_on_cached_features_equals_the_step_on_images_and_captions(lock, pooling):
    """The feature cache changes where the locked layers' outputs come from, not the training:
    with a tower's last layers (or groups) training, they start from the cached input of the first;
    Sparse-Avg's positions follow from a cached feature map as from the pixels."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(pretrained(lock=lock, pooling=pooling)).train())
    raw, cached = models
    images, texts = inputs(raw, n=6)
    with torch.no_grad():
        features = cached.tower_features(images, texts)
    cached.read_cached_inputs(True)
    optim = OptimParams(lr=1e-2, warmup_steps=0)
    for model, batch in ((raw, {"image": images, "text": texts}),
                         (cached, {"image": features["image"], "text": features["text"]})):
        step = RecipeStep(model, make_optimizer(model, optim), SparseClipObjective(model.params), optim, total=3)
        torch.manual_seed(1)  # the trainable text layers' dropout draws the same masks in both
        for i in range(2):
            losses, _, _ = step(batch, i)
        model.final_loss = losses["loss"].item()
    assert raw.final_loss == pytest.approx(cached.final_loss, rel=1e-5)
    # Adam moves each weight ~lr a step whatever its gradient's size, so rounding differences of
    # ~1e-7 in the trainable text layers' tiny gradients show as ~1e-4: a step is 1e-2
    atol = 1e-6 if not (lock.get("text_unlocked_layers") or lock.get("image_unlocked_groups")) else 1e-3
    for (name, a), b in zip(raw.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, atol=atol), name


def test_cached_inputs_need_both_towers_locked():
    model = build_model(pretrained(lock={"image": True}))
    assert model.cacheable_towers() == ["image"]
    with pytest.raises(ValueError, match="cacheable here: image"):
        model.read_cached_inputs(True)
    # Sparse-Avg reads every position of the last feature map: the pooled rows of a fully locked
    # tower cannot give them, the input of a trainable last group can
    assert build_model(pretrained(pooling="avg")).cacheable_towers() == ["text"]
    assert build_model(pretrained(lock={"image": True, "image_unlocked_groups": 1, "text": True},
                                  pooling="avg")).cacheable_towers() == ["image", "text"]


def test_inputs_follow_the_towers(locked):
    """EfficientNet-lite's pixels are (x - 0.5) / 0.5 and MiniLM reads WordPiece ids ([CLS] = 101)."""
    pre = ClipBatchPreprocessor.for_model(locked)
    assert tuple(pre.mean) == (0.5, 0.5, 0.5) and pre.size == (IMAGE, IMAGE)
    ids = pre.tokens(["a dog"])
    assert ids.shape == (1, 12) and ids[0, 0] == 101 and ids[0, -1] == 0


def test_conv_tower_positions_average_to_the_pooled_embedding(locked):
    """Heatmaps read one embedding per position of the last feature map; with an average pool and
    a linear projection their mean is the pooled embedding exactly."""
    images, _ = inputs(locked)
    with torch.no_grad():
        feature_map = locked.clip.visual.trunk.forward_features(images)
        pooled, positions = locked._timm_head(feature_map, want_tokens=True)
        _, tokens = locked.encode_image_tokens(images)
    assert positions.shape[1] == feature_map.shape[2] * feature_map.shape[3] == tokens.shape[1]
    assert torch.allclose(positions.mean(1), pooled, atol=1e-5)
    assert locked.residual_tokens(images, -2).shape[-1] == locked.residual_width(-2) == 112


def test_the_vlm_reads_a_locked_towers_cached_rows_as_it_reads_pixels(tmp_path, locked):
    """The VLM's encoder gives the same sparse features from the tower cache's rows as from the
    photos; it reads the cache only where the cache holds its towers and the VLM wants pooled
    features."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.clip.feature_cache import MANIFEST
    from pipeline.config import VLMParams
    from pipeline.vlm.model import VisionLanguageModel
    from pipeline.vlm.train import readable_tower_cache

    from .test_model_loss import micro

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    tokenizer = type("Tokenizer", (), {"convert_tokens_to_ids": staticmethod(lambda token: 0)})()
    vlm = VisionLanguageModel(locked.eval(), lm, tokenizer, hidden=8)
    images, _ = inputs(locked)
    with torch.no_grad():
        rows = locked.tower_features(images=images)["image"]
    assert torch.allclose(vlm.sparse_features(rows), vlm.sparse_features(images), atol=1e-5)
    vlm.features = "tokens"
    with pytest.raises(ValueError, match="feature map"):
        vlm.sparse_features(rows)

    (tmp_path / MANIFEST).write_text(json.dumps({"cached": True, "towers": locked.params.towers.model_dump(mode="json"),
                                                 "lock": locked.params.lock.model_dump(mode="json")}))
    assert readable_tower_cache(tmp_path, locked, VLMParams()) == tmp_path
    assert readable_tower_cache(tmp_path, locked, VLMParams(features="tokens")) is None
    assert readable_tower_cache(None, locked, VLMParams()) is None
    assert readable_tower_cache(tmp_path, build_model(micro()), VLMParams()) is None  # an inline tower trains
    other = build_model(pretrained(towers={"image": "efficientnet-lite1", "text": "all-minilm-l6-v2",
                                           "image_size": IMAGE, "context_length": 12}))
    assert readable_tower_cache(tmp_path, other, VLMParams()) is None  # the cache holds another tower's rows


def test_the_encoding_actors_run_channels_last_and_give_the_default_layouts_outputs():
    """The tower cache's and the reference's encoders keep their convolution weights channels-last
    (benchmarks/conv_layout.py: 1.6-1.8x faster on a CPU core); what they encode is unchanged."""
    import copy

    from pipeline.activations.reference import build_reference
    from pipeline.activations.tower_cache import TowerEncoder
    from pipeline.config import ReferenceParams

    reference, _ = build_reference(ReferenceParams(encoder="efficientnet-lite2", image_size=IMAGE))
    tower = TowerEncoder(pretrained().model_dump(mode="json")).model
    images, _ = inputs(tower)
    for encoder, encode in ((reference, lambda m: m(images)),
                            (tower, lambda m: m.tower_features(images=images)["image"])):
        stem = next(p for p in encoder.parameters() if p.ndim == 4)  # a 3x3 convolution: the layouts differ
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        default = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            assert torch.allclose(encode(encoder), encode(default), atol=1e-4)


def test_a_saved_pretrained_model_reloads_without_the_machines_paths(tmp_path, locked):
    save_model(locked, tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert "site-packages" not in config and "packaged:all-minilm-l6-v2" in config
    reloaded = load_model(tmp_path)
    images, texts = inputs(locked)
    with torch.no_grad():
        assert torch.equal(locked.eval().encode_image(images), reloaded.encode_image(images))
        assert torch.equal(locked.encode_text(texts), reloaded.encode_text(texts))


def test_finetune_preset_builds_from_a_local_checkpoint(tmp_path, monkeypatch):
    """deploy/params.finetune-vit-b-32.yaml: open_clip's ViT-B-32 from a local checkpoint (here a
    random one saved for the test), the paper's sparse heads and caps."""
    import open_clip

    from pipeline.runtime.job import read_override

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    checkpoint = tmp_path / "vit-b-32.pt"
    torch.save({"state_dict": reference.state_dict()}, checkpoint)
    overrides = read_override(REPO / "deploy" / "params.finetune-vit-b-32.yaml")
    overrides["train.model.checkpoint"] = str(checkpoint)
    params = load_params(REPO / "params.yaml", overrides=overrides)
    assert params.train.variants["sparse"].logit_scale_cap == 50 and params.train.variants["sparse_plus"].logit_scale_cap == 40
    model = build_model(params.train.model_for("sparse"))
    assert model.width == 512 * params.train.model.expansion
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], tensor), name
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.eval().encode_image(images).shape == (1, model.width)


def preset_params(tmp_path, **overrides):
    """deploy/params.flickr8k.yaml merged into params.yaml as `make pipeline-flickr8k` merges it."""
    import shutil

    from pipeline.runtime.job import apply_overrides, read_override

    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    apply_overrides(params_file, read_override(REPO / "deploy" / "params.flickr8k.yaml"))
    return load_params(params_file, overrides=overrides)


@pytest.mark.integration
@pytest.mark.flickr
@pytest.mark.parametrize("unlocked_groups", [0, 1], ids=["locked", "last-image-group-trains"])
def test_preset_slice_caches_trains_and_extracts_from_cached_features(tmp_path, ray_local, flickr_dir, unlocked_groups):
    """The Flickr8k preset on a 300-pair slice: the tower_cache stage's rows are what the towers
    compute (pooled, or a feature map with the image tower's last group training); training from
    them runs in Ray Train; extraction's activations with the cache equal those without."""
    from pipeline.activations.extract import SparseEncoder
    from pipeline.activations.tower_cache import run_feature_cache
    from pipeline.clip.feature_cache import FeatureCache, cached_split
    from pipeline.clip.train import run_training
    from pipeline.config import ExtractParams, RayParams
    from pipeline.data.loading import load_split_arrays
    from pipeline.data.sampling import run_sample

    params = preset_params(tmp_path, **{
        "sample.source.path": str(flickr_dir / "captions.csv"), "sample.source.image_root": str(flickr_dir / "images"),
        "sample.n": 300, "sample.shard_size": 100, "sample.out_dir": str(tmp_path / "data"),
        "train.global_batch_size": 32, "train.epochs": 1, "train.eval_every": 4, "train.log_every": 1,
        "train.val_images": 32, "train.feature_cache_dir": str(tmp_path / "cache"),
        "train.out_dir": str(tmp_path / "models"), "ray.storage_path": str(tmp_path / "ray_results"),
        "train.model.lock.image_unlocked_groups": unlocked_groups,
    })
    run_sample(params.sample, RayParams(num_cpus=2))
    manifest = run_feature_cache(params.train.model, params.sample.out_dir, params.train.feature_cache_dir,
                                 ExtractParams(batch_size=32, actors=1), 0.5)
    assert manifest["cached"] and manifest["rows"]["texts"] == 300
    assert FeatureCache.available(params.train.feature_cache_dir, params.train.model_for("sparse"))

    model = build_model(params.train.model_for("sparse")).eval()
    arrays, _ = load_split_arrays(params.sample.out_dir, "val", ClipBatchPreprocessor.for_model(model))
    cached = cached_split(params.train.feature_cache_dir, params.sample.out_dir, "val")
    with torch.no_grad():
        fresh = model.tower_features(torch.as_tensor(arrays["image"]), torch.as_tensor(arrays["text"]))
    assert np.allclose(cached["image"], fresh["image"].numpy(), atol=1e-4)
    assert np.allclose(cached["text"], fresh["text"].numpy(), atol=1e-4)
    # one record per photo (validation's retrieval): the cache picks the rows decoding picks
    one, metas = load_split_arrays(params.sample.out_dir, "val", ClipBatchPreprocessor.for_model(model),
                                   one_per_group=True)
    cached_one = cached_split(params.train.feature_cache_dir, params.sample.out_dir, "val", one_per_group=True)
    assert len({m["group"] for m in metas}) == len(metas) == len(cached_one["image"]) <= len(cached["image"])
    with torch.no_grad():
        fresh_one = model.tower_features(torch.as_tensor(one["image"]), torch.as_tensor(one["text"]))
    assert np.allclose(cached_one["text"], fresh_one["text"].numpy(), atol=1e-4)

    outcome = run_training(params, "sparse")
    assert json.loads((outcome.model_dir / "config.json").read_text())["model"]["lock"]["image"]

    # the VLM's photos from the cache: the same examples, and the rows the tower gives their pixels
    from pipeline.vlm.train import qa_examples

    vlm_params = params.vlm.model_copy(update={"question_types": ["subject"]})
    pixels, examples, metas = qa_examples(params.sample.out_dir, "val", vlm_params,
                                          ClipBatchPreprocessor.for_model(model), limit=6)
    rows, cached_examples, cached_metas = qa_examples(params.sample.out_dir, "val", vlm_params,
                                                      ClipBatchPreprocessor.for_model(model), limit=6,
                                                      tower_cache=params.train.feature_cache_dir)
    assert cached_examples == examples and cached_metas == metas and rows.shape[0] == pixels.shape[0] == 6
    with torch.no_grad():
        assert torch.allclose(rows, model.tower_features(images=pixels)["image"], atol=1e-4)

    batch = {"key": [], "jpg": [], "text": [], "group": [], "split": [], "meta": [], "task": [], "label": [],
             "set": [], "kind": [], "checkpoint": []}
    from pipeline.data.shards import read_split

    for record in list(read_split(params.sample.out_dir, "val"))[:4]:
        for kind in ("image", "text"):
            for column, value in {"key": record.key, "jpg": record.jpeg, "text": record.caption,
                                  "group": str(record.meta["group"]), "split": "val", "meta": "", "task": "",
                                  "label": "", "set": kind + "s", "kind": kind, "checkpoint": "final"}.items():
                batch[column].append(value)
    with_cache = SparseEncoder(str(outcome.model_dir), feature_cache=params.train.feature_cache_dir)(batch)
    without = SparseEncoder(str(outcome.model_dir))(batch)
    assert with_cache.column("key").to_pylist() == without.column("key").to_pylist()
    for a, b in zip(with_cache.column("values").to_pylist(), without.column("values").to_pylist()):
        assert np.allclose(a, b, atol=1e-4)


def test_flickr8k_preset_drops_sparse_avg_where_dvc_reads_it(tmp_path):
    """The preset's `sparse_avg: null` removes the variant from the written params file, so DVC's
    foreach makes no stage for it; the rest is the real-photo recipe."""
    import yaml

    params = preset_params(tmp_path)
    assert set(yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["variants"]) == {"dense", "sparse", "sparse_plus"}
    model = params.train.model_for("sparse")
    assert model.towers.image == "efficientnet-lite0" and model.lock.image and model.lock.text
    assert params.reference.encoder != model.towers.image  # Clarity is judged by another encoder


def test_cached_layer_inputs_are_written_flat_and_read_back_padded(tmp_path):
    """A text tower unlocked for its last two layers: the tower_cache actor keeps each caption's
    own tokens, flat; the cache reads them back padded to the longest, and the model's text
    embedding from them is its embedding from the caption."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.activations.tower_cache import TowerEncoder, cache_plan
    from pipeline.clip.feature_cache import MANIFEST, FeatureCache

    params = pretrained(lock={"image": True, "text": True, "text_unlocked_layers": 2})
    plan = cache_plan(params)
    channels = plan.text_channels
    assert plan.cacheable and channels == 384 + 1 and plan.image_shape is None  # MiniLM's width plus the mask
    torch.manual_seed(0)
    encoder = TowerEncoder(params.model_dump(mode="json"))
    captions = ["a dog", "two men sit on a long wooden bench in a park", "a red car"]
    jpeg = io.BytesIO()
    Image.new("RGB", (IMAGE, IMAGE), (200, 30, 30)).save(jpeg, "JPEG")
    batch = {"kind": ["text"] * 3 + ["image"], "key": ["t0", "t1", "t2", "i0"], "group": ["g0", "g1", "g2", "g0"],
             "split": ["val"] * 4, "set": ["texts"] * 3 + ["images"], "text": captions + [""],
             "jpg": [b""] * 3 + [jpeg.getvalue()]}
    table = encoder(batch)
    texts = table.filter(pa_equal(table, "text"))
    assert texts.column("text").to_pylist() == captions
    lengths = [len(row) // channels for row in texts.column("feature").to_pylist()]
    tokens = torch.as_tensor(encoder.preprocess.tokens(captions))
    assert lengths == (tokens != 0).sum(dim=1).tolist()  # each caption's own tokens, no padding
    for name, kind in (("images", "image"), ("texts", "text")):
        (tmp_path / name).mkdir()
        pq.write_table(table.filter(pa_equal(table, kind)), tmp_path / name / "part-0.parquet")
    (tmp_path / MANIFEST).write_text(json.dumps({"cached": True, "text_channels": channels}))

    rows = FeatureCache(tmp_path).lookup_texts(captions)
    assert rows.shape == (3, max(lengths), channels) and rows[0, lengths[0]:].sum() == 0
    model = encoder.model
    with torch.no_grad():
        assert torch.allclose(model.encode_text_features(torch.as_tensor(rows)), model.encode_text(tokens), atol=1e-5)


def pa_equal(table, kind: str):
    import pyarrow.compute as pc

    return pc.equal(table.column("set"), "images" if kind == "image" else "texts")


def test_a_trainable_units_input_is_cached_flat_and_read_back_as_its_feature_map(tmp_path):
    """An image tower unlocked for its last two groups: the cache stores the input of the first
    trainable unit flat, the manifest its [C, H, W]; the rows read back are feature maps, and the
    model's image embedding from them (and the VLM's, which tells them from pixels) is its
    embedding from the pixels."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.activations.tower_cache import TowerEncoder, cache_plan
    from pipeline.clip.feature_cache import MANIFEST, FeatureCache

    params = pretrained(lock={"image": True, "image_unlocked_groups": 2, "text": True})
    plan = cache_plan(params)
    assert plan.cacheable and plan.image_shape == [192, IMAGE // 32, IMAGE // 32]  # the input of lite0's block 5.3
    torch.manual_seed(0)
    encoder = TowerEncoder(params.model_dump(mode="json"))
    jpegs = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        jpeg = io.BytesIO()
        Image.new("RGB", (IMAGE, IMAGE), colour).save(jpeg, "JPEG")
        jpegs.append(jpeg.getvalue())
    batch = {"kind": ["image"] * 2, "key": ["i0", "i1"], "group": ["g0", "g1"], "split": ["val"] * 2,
             "set": ["images"] * 2, "text": ["", ""], "jpg": jpegs}
    table = encoder(batch)
    assert [len(row) for row in table.column("feature").to_pylist()] == [int(np.prod(plan.image_shape))] * 2
    for name in ("images", "texts"):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part-0.parquet")
    (tmp_path / MANIFEST).write_text(json.dumps({"cached": True, "image_shape": plan.image_shape}))

    rows = torch.as_tensor(FeatureCache(tmp_path).lookup_images(["i0", "i1"]))
    assert rows.shape == (2, *plan.image_shape)
    model = encoder.model.eval()
    pixels = torch.as_tensor(np.stack([encoder.preprocess.image(j) for j in jpegs]))
    assert model.holds_pixels(pixels) and not model.holds_pixels(rows)
    model.requires_grad_(False)  # as the VLM freezes its encoder: the rows still enter where the lock split
    assert model.image_cache_unit == 16 and model.cacheable_towers() == ["image", "text"]
    with torch.no_grad():
        assert torch.allclose(model.encode_image_features(rows), model.encode_image(pixels), atol=1e-5)
