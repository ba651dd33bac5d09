"""The convolutional image tower (open_clip's ModifiedResNet): the sparse heads read its pooled
embedding, Sparse-Avg and heatmaps read one token per position of its last feature map, and the
residual SAE reads a stage's feature map (issue 28: the embedded run's tower)."""

from __future__ import annotations

import torch

from pipeline.clip.model import build_model
from pipeline.config import ModelParams

from .test_model_loss import MICRO

CONV = {**MICRO, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}


def conv(**overrides) -> ModelParams:
    return ModelParams(inline=CONV, **{"expansion": 4, **overrides})


def test_the_pooled_embedding_is_the_attention_pool_through_the_head():
    torch.manual_seed(0)
    model = build_model(conv()).eval()
    images = torch.randn(3, 3, 64, 64)
    assert model.convolutional and not build_model(ModelParams(inline=MICRO)).convolutional
    expected = model.image_head(model.clip.visual(images))  # open_clip's own forward: stem, stages, pool
    assert torch.allclose(model.encode_image(images), expected, atol=1e-6)
    pooled, tokens = model.encode_image_tokens(images)
    assert torch.equal(pooled, model.encode_image(images))
    assert tokens.shape == (3, 4, model.width)  # 64 px / 32 = a 2 x 2 feature map


def test_a_position_token_is_what_the_pool_returns_when_it_attends_to_that_position_alone():
    """The tokens are the pool's value and output projections of each position: the pool's output
    is a convex mix of exactly these (plus the mean token's), so they live in its space."""
    torch.manual_seed(0)
    model = build_model(conv(expansion=0, activation="none")).eval()
    visual = model.clip.visual
    images = torch.randn(2, 3, 64, 64)
    _, tokens = model.encode_image_tokens(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    pool = visual.attnpool
    position = x.flatten(2)[:, :, 1] + pool.positional_embedding[2]
    assert torch.allclose(tokens[:, 1], pool.c_proj(pool.v_proj(position)), atol=1e-5)


def test_sparse_avg_pools_the_position_tokens():
    torch.manual_seed(0)
    model = build_model(conv(pooling="avg")).eval()
    pooled, tokens = model.encode_image_tokens(torch.randn(2, 3, 64, 64))
    assert torch.allclose(pooled, tokens.mean(dim=1))


def test_the_residual_tokens_of_a_stage_are_its_feature_map_after_their_mean():
    torch.manual_seed(0)
    model = build_model(conv()).eval()
    visual = model.clip.visual
    images = torch.randn(2, 3, 64, 64)
    assert model.vision_layers == 4
    tokens = model.residual_tokens(images, 1)
    x = visual.layer2(visual.layer1(visual.stem(images))).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 1 + 8 * 8, 8 * 2 * 4) and model.residual_width(1) == 8 * 2 * 4
    assert torch.allclose(tokens[:, 1:], x) and torch.allclose(tokens[:, 0], x.mean(dim=1))


def test_a_conv_tower_trains_and_its_training_time_is_logged_without_evaluations():
    from pipeline.clip.recipe import train_in_process
    from pipeline.config import TrainParams

    data = {"image": torch.randn(16, 3, 64, 64).numpy(), "text": torch.randint(1, 99, (16, 8)).numpy()}
    train = TrainParams(global_batch_size=8, log_every=2, optim={"warmup_steps": 1})
    model, curves = train_in_process(conv(), train, data, None, steps=4, seed=0)
    seconds = [curves[s]["train/seconds"] for s in sorted(curves)]
    assert sorted(curves) == [2, 4] and 0 < seconds[0] < seconds[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
