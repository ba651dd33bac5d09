"""TiledClipLoss equals open_clip's ClipLoss: value and gradients, in one process and on
1, 2 and 4 gloo workers, with blocks sent densely or as (index, value) pairs, in fp32
and under bf16 autocast (to bf16 tolerance); the single-process simulation equals brute
force on the concatenated batch."""

from __future__ import annotations

import socket
import warnings
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from benchmarks import simulated
from pipeline.clip.loss import SparseClipObjective
from pipeline.clip.tiled_loss import TiledClipLoss, tiled_clip_loss
from pipeline.clip.model import build_model
from tests.test_model_loss import batch, micro

WIDTH = 32


def features(n: int, seed: int, sparse: bool, dtype=torch.float32) -> torch.Tensor:
    """Unit rows; ``sparse``: ReLU(x - 1), about 16% non-zero, like a sparse head."""
    x = torch.randn(
        n, WIDTH, generator=torch.Generator().manual_seed(seed), dtype=dtype
    )
    return F.normalize(F.relu(x - 1) if sparse else x, dim=-1)


def loss_and_grads(loss_fn, image, text, scale):
    """Loss value and gradients w.r.t. fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_close(actual, expected, what: str, atol: float = 1e-6) -> None:
    assert torch.allclose(actual, expected, atol=atol, rtol=1e-5), (
        what,
        (actual - expected).abs().max().item(),
    )


# bf16 keeps 8 significant bits: a product of unit vectors is off by up to ~2^-8 of the
# largest term, so a loss (scale x products) by ~scale x 2^-8 and a gradient by a few
# 2^-8 of its largest entry; open_clip's own loss under autocast is that far from fp64
BF16_RELATIVE = 2**-5


def assert_bf16_close(actual, expected, what: str) -> None:
    """Equal to bf16 tolerance: the gap is small next to the largest entry."""
    gap = (actual - expected).abs().max().item()
    assert gap <= BF16_RELATIVE * max(expected.abs().max().item(), 1.0), (what, gap)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_single_process_equals_clip_loss(dtype, sparse):
    image, text = features(8, 0, sparse, dtype), features(8, 1, sparse, dtype)
    scale = torch.tensor(20.0, dtype=dtype)
    expected = loss_and_grads(ClipLoss(), image, text, scale)
    actual = loss_and_grads(TiledClipLoss(), image, text, scale)
    assert_close(actual[0], expected[0], "loss")
    for name, a, e in zip(("image", "text", "scale"), actual[1], expected[1]):
        assert_close(a, e, name)


def bf16_products_loss(image, text, scale):
    """Brute force with the tile products rounded as autocast rounds them: bf16 inputs,
    fp32 out, then fp32 logits and cross-entropy."""
    raw = (image.bfloat16() @ text.bfloat16().T).float()
    labels = torch.arange(len(image))
    logits = scale * raw
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("sparse", [False, True])
def test_under_bf16_autocast_the_products_are_bf16_and_the_rest_exact(sparse):
    image, text = features(64, 0, sparse), features(64, 1, sparse)
    scale = torch.tensor(30.0)
    with bf16_autocast():
        tiled = loss_and_grads(TiledClipLoss(), image, text, scale)
        clip = loss_and_grads(ClipLoss(), image, text, scale)
    fp32 = loss_and_grads(TiledClipLoss(), image, text, scale)
    same_rounding = loss_and_grads(bf16_products_loss, image, text, scale)
    # the products did run in bf16: fp32 tiles would give another value
    assert (tiled[0] - fp32[0]).abs() > 1e-5
    # the logsumexp and the scale's gradient are exact given the bf16 products
    assert_close(tiled[0], same_rounding[0], "loss", atol=1e-5)
    assert_close(tiled[1][2], same_rounding[1][2], "dscale", atol=1e-5)
    for name, a, e in zip(("image", "text"), tiled[1], same_rounding[1]):
        assert_bf16_close(a, e, f"d{name}")
    # and open_clip under the same autocast agrees to bf16 tolerance
    assert_bf16_close(tiled[0], clip[0], "loss vs ClipLoss")
    assert all(g.dtype == torch.float32 for g in tiled[1])
    for name, a, e in zip(("image", "text", "scale"), tiled[1], clip[1]):
        assert_bf16_close(a, e, f"d{name} vs ClipLoss")


def test_fp64_features_ignore_autocast():
    image, text = features(8, 0, False, torch.float64), features(8, 1, False, torch.float64)
    scale = torch.tensor(20.0, dtype=torch.float64)
    with bf16_autocast():
        tiled = loss_and_grads(TiledClipLoss(), image, text, scale)
    expected = loss_and_grads(ClipLoss(), image, text, scale)
    assert_close(tiled[0], expected[0], "loss", atol=1e-12)


def test_output_dict_and_unsupported_combinations():
    image, text = features(4, 0, False), features(4, 1, False)
    out = TiledClipLoss()(image, text, 10.0, output_dict=True)
    assert torch.allclose(out["contrastive_loss"], ClipLoss()(image, text, 10.0))
    with pytest.raises(NotImplementedError, match="local_loss=True"):
        TiledClipLoss(local_loss=False, world_size=2)
    with pytest.raises(NotImplementedError, match="horovod"):
        TiledClipLoss(local_loss=True, use_horovod=True)
    with pytest.raises(NotImplementedError, match="logit_bias"):
        TiledClipLoss()(image, text, 10.0, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="torch.distributed"):
        TiledClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2)(
            image, text, 10.0
        )


def test_simulated_helper_equals_brute_force_on_the_concatenated_batch():
    local = [features(4, s, True).requires_grad_() for s in (0, 1)]
    others = [
        (features(4, 2 * k + 2, True), features(4, 2 * k + 3, True)) for k in range(3)
    ]
    others = [(i.requires_grad_(), t.requires_grad_()) for i, t in others]
    scale = torch.tensor(15.0, requires_grad=True)

    all_img = torch.cat([local[0]] + [i for i, _ in others])
    all_txt = torch.cat([local[1]] + [t for _, t in others])
    labels = torch.arange(4)
    brute = (
        F.cross_entropy(scale * local[0] @ all_txt.T, labels)
        + F.cross_entropy(scale * local[1] @ all_img.T, labels)
    ) / 2
    leaves = [*local, scale, *[t for pair in others for t in pair]]
    expected = torch.autograd.grad(brute, leaves)

    remote = {}
    loss = tiled_clip_loss(
        *local,
        scale,
        lambda: iter([(i.detach(), t.detach()) for i, t in others]),  # read twice
        remote_grad=lambda k, d_img, d_txt: remote.update({k: (d_img, d_txt)}),
    )
    actual = torch.autograd.grad(loss, [*local, scale])
    assert_close(loss, brute, "loss")
    actual += tuple(g for k in range(3) for g in remote[k])
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, f"gradient {k}")


def check_simulated_worker(device: str, workers: int, rows: int, width: int, atol: float = 1e-6,
                           bf16: bool = False) -> None:
    """The benchmarks' rank-0 simulation: open_clip's ClipLoss (its gather a concatenation of the
    fed-in blocks) and the tiled loss give the same value and gradients on the same blocks
    (``bf16``: both under bf16 autocast, equal to bf16 tolerance)."""
    others = simulated.other_blocks(workers, rows, width, 0.05, device)
    local = simulated.make_block(0, rows, width, 0.05, device)
    scale = torch.tensor(30.0, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        results = [
            loss_and_grads(lambda i, t, s, fn=fn: fn(i, t, s, others, workers), *local, scale)
            for fn in (simulated.clip_loss, simulated.tiled_loss)
        ]
    (clip_value, clip_grads), (tiled_value, tiled_grads) = results
    assert clip_value.item() > 0
    close = assert_bf16_close if bf16 else partial(assert_close, atol=atol)
    close(tiled_value, clip_value, "loss")
    for name, a, e in zip(("image", "text", "scale"), tiled_grads, clip_grads):
        close(a, e, name)


@pytest.mark.parametrize("bf16", [False, True])
def test_simulated_worker_losses_agree(bf16):
    check_simulated_worker("cpu", workers=6, rows=16, width=512, bf16=bf16)


def test_objective_selects_the_loss():
    torch.manual_seed(0)
    params = micro(expansion=4)
    out = build_model(params)(*batch(6))
    clip = SparseClipObjective(params)(out)["loss"]
    tiled_objective = SparseClipObjective(
        params, loss="tiled", sparse_transport_density=0.05
    )
    assert isinstance(tiled_objective.contrastive, TiledClipLoss)
    assert torch.allclose(tiled_objective(out)["loss"], clip)
    with pytest.raises(ValueError, match="loss"):
        SparseClipObjective(params, loss="siglip")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (features sparse?, sparse_transport_density, gather_with_grad, under bf16 autocast?)
MODES = {
    "dense": (False, None, True, False),
    "sparse_features_dense_grads": (True, 0.3, True, False),  # features as COO, grads dense
    "coo_everything": (True, 2.0, True, False),  # every block as COO, gradients too
    "no_gather_grad": (False, None, False, False),
    "bf16": (True, None, True, True),  # both losses under autocast: bf16 products
}


def _worker(rank: int, world: int, port: int, out_dir) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's all_gather
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    results = {}
    for mode, (sparse, density, with_grad, bf16) in MODES.items():
        image, text = features(3, 2 * rank, sparse), features(3, 2 * rank + 1, sparse)
        scale = torch.tensor(12.0)
        flags = {"local_loss": True, "gather_with_grad": with_grad}
        clip = ClipLoss(**flags, rank=rank, world_size=world)
        tiled = TiledClipLoss(
            **flags, rank=rank, world_size=world, sparse_transport_density=density
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            results[mode] = {
                "clip": loss_and_grads(clip, image, text, scale),
                "tiled": loss_and_grads(tiled, image, text, scale),
                "stats": dict(tiled.transport.stats),
            }
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_workers(world: int, tmp_path) -> list[dict]:
    """Fork the workers from a forkserver that imported this module (torch, open_clip)
    once for the session: spawning would pay those imports in every worker."""
    mp.set_forkserver_preload([__name__])
    mp.start_processes(
        _worker,
        args=(world, _free_port(), tmp_path),
        nprocs=world,
        start_method="forkserver",
    )  # raises if a rank fails
    return [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gloo_workers_match_clip_loss_with_gather_with_grad(world, tmp_path):
    for rank, results in enumerate(run_workers(world, tmp_path)):
        for mode, result in results.items():
            (clip_loss, clip_grads), (tiled_loss, tiled_grads) = (
                result["clip"],
                result["tiled"],
            )
            close = assert_bf16_close if MODES[mode][3] else assert_close
            close(tiled_loss, clip_loss, f"rank {rank} {mode} loss")
            for name, a, e in zip(("image", "text", "scale"), tiled_grads, clip_grads):
                close(a, e, f"rank {rank} {mode} d{name}")
        stats = {mode: result["stats"] for mode, result in results.items()}
        assert stats["dense"]["sparse_blocks"] == 0
        if world == 1:  # nothing travels
            assert all(s["sparse_blocks"] + s["dense_blocks"] == 0 for s in stats.values())
            continue
        # each pass sends W - 1 feature blocks (as COO here); W gradient accumulators
        sparse_run = stats["sparse_features_dense_grads"]
        assert sparse_run["sparse_blocks"] + sparse_run["dense_blocks"] == 3 * world - 2
        assert sparse_run["sparse_blocks"] >= 2 * (world - 1)
        assert stats["coo_everything"]["dense_blocks"] == 0
