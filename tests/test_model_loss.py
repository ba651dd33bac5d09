"""The Sparse CLIP model and its loss: activations, pooling, logit cap, checkpoints, and the
2-worker gradient equivalence of open_clip's ClipLoss(local_loss, gather_with_grad)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss

from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.heads import TopK
from pipeline.clip.model import build_model, load_model, save_model
from pipeline.config import ModelParams

MICRO = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def micro(**overrides) -> ModelParams:
    return ModelParams(inline=MICRO, **overrides)


def batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 100, (n, 8), generator=g)


def l0(x: torch.Tensor) -> float:
    return (x != 0).float().sum(-1).mean().item()


def test_relu_is_sparse_none_is_dense_topk_is_exact():
    torch.manual_seed(0)
    images, texts = batch(8)
    for activation, check in [
        ("relu", lambda v, w: 0 < v < w),
        ("none", lambda v, w: v == w),
        ("topk", lambda v, w: 0 < v <= 5),  # the 5 picked, less those whose value is <= 0
        ("l1", lambda v, w: 0 < v < w),
    ]:
        model = build_model(micro(expansion=8, activation=activation, topk=5))
        out = model(images, texts)
        assert model.width == 16 * 8
        for key in ("image_raw", "text_raw"):
            assert check(l0(out[key]), model.width), (activation, key, l0(out[key]))
    dense = build_model(micro(expansion=0, activation="relu"))
    assert dense.width == 16 and l0(dense(images, texts)["image_raw"]) == 16  # dense ignores activation


def test_centred_topk_picks_per_input_features_where_raw_topk_picks_one_support():
    """A component every input shares (CLIP embeddings have one) makes raw TopK pick the same
    features for all; centring by the feature mean leaves each input its own, values unchanged."""
    shared = torch.tensor([10.0, 9.0, 0, 0, 0, 0])
    x = shared + torch.cat([torch.zeros(4, 2), 3 * torch.eye(4)], dim=1)  # input i also has feature 2 + i
    raw, centred = TopK(2, 6, centred=False), TopK(2, 6)
    assert {tuple(row.nonzero().flatten().tolist()) for row in raw(x)} == {(0, 1)}
    picked = centred(x)
    assert [int(row[2:].argmax()) + 2 for row in picked] == [2, 3, 4, 5] and (picked[:, 2:].sum(1) == 3).all()
    assert torch.equal(picked[picked != 0], x[picked != 0])  # the kept values are the raw pre-activations
    assert torch.allclose(centred.running_mean, 0.1 * x.mean(0))  # tracked, as BatchNorm tracks its mean

    centred.eval()  # at inference an input's features do not depend on the rest of its batch
    assert torch.equal(centred(x[:1]), centred(x)[:1])
    assert torch.allclose(centred.running_mean, 0.1 * x.mean(0))  # and eval does not move the mean


def test_topk_selection_is_a_param_and_the_mean_is_saved_with_the_model(tmp_path):
    model = build_model(micro(expansion=4, activation="topk", topk=3))
    images, texts = batch(4)
    model(images, texts)  # one training forward moves the running mean
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.image_head.activation.running_mean, model.image_head.activation.running_mean)
    assert loaded.image_head.activation.running_mean.abs().sum() > 0
    raw = build_model(micro(expansion=4, activation="topk", topk=3, topk_selection="raw"))
    assert not raw.image_head.activation.centred and "image_head.activation.running_mean" not in raw.state_dict()


def test_head_sits_on_open_clips_projection():
    model = build_model(micro(expansion=4))
    images, texts = batch(2)
    with torch.no_grad():
        dense_text = model.clip.encode_text(texts)
        expected = torch.relu(model.text_head.linear(dense_text))
        assert torch.allclose(model.encode_text(texts), expected)
        normed = model.encode_text(texts, normalize=True)
        assert torch.allclose(normed.norm(dim=-1), torch.ones(2))


def test_avg_pooling_is_the_mean_of_token_activations():
    model = build_model(micro(expansion=4, pooling="avg"))
    images, _ = batch(3)
    with torch.no_grad():
        pooled, tokens = model.encode_image_tokens(images)
    assert tokens.shape == (3, 16, model.width)  # (32/8)^2 spatial tokens
    assert torch.allclose(pooled, tokens.mean(dim=1)) and (tokens >= 0).all()
    cls_model = build_model(micro(expansion=4, pooling="cls"))
    with torch.no_grad():
        pooled_cls, tokens_cls = cls_model.encode_image_tokens(images)
    assert tokens_cls.shape == tokens.shape and not torch.allclose(pooled_cls, tokens_cls.mean(1))


def test_logit_scale_is_capped_by_param():
    model = build_model(micro(logit_scale_cap=40))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert math.isclose(model.logit_scale.exp().item(), 40.0, rel_tol=1e-5)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = build_model(micro(expansion=4, activation="topk", topk=3))
    save_model(model, tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "image_head.linear.weight" in state
    loaded = load_model(tmp_path)
    images, texts = batch(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(images, texts)["image_raw"], loaded(images, texts)["image_raw"])
    assert loaded.params.activation == "topk" and loaded.params.topk == 3


def test_objective_matches_open_clip_and_adds_l1():
    torch.manual_seed(0)
    model = build_model(micro(expansion=4, activation="l1", l1_lambda=0.01))
    out = model(*batch(6))
    losses = SparseClipObjective(model.params)(out)
    reference = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    assert torch.allclose(losses["contrastive_loss"], reference)
    l1 = out["image_features"].abs().sum(-1).mean() + out["text_features"].abs().sum(-1).mean()
    assert torch.allclose(losses["loss"], reference + 0.01 * l1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, params: ModelParams, images, texts, out_path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(params))
    local = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    loss = SparseClipObjective(params, rank, world)(model(images[local], texts[local]))["loss"]
    loss.backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.module.named_parameters() if p.grad is not None}, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("activation", ["relu", "l1"])
def test_two_gloo_workers_give_the_single_process_gradients(activation, tmp_path):
    params = micro(expansion=4, activation=activation, l1_lambda=0.05)
    images, texts = batch(8, seed=1)
    torch.manual_seed(0)
    reference = build_model(params)
    SparseClipObjective(params)(reference(images, texts))["loss"].backward()
    expected = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}

    out_path = tmp_path / "grads.pt"
    mp.start_processes(_worker, args=(2, _free_port(), params, images, texts, out_path), nprocs=2,
                       start_method="spawn")  # raises if a rank fails
    grads = torch.load(out_path, weights_only=True)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name

