"""The GPU paths, on a CUDA machine (skipped elsewhere; CI has no GPU): the tiled loss equals
open_clip's on the device, and Ray Train trains Sparse CLIP with ``use_gpu`` in bf16 with its
process group on NCCL. One GPU holds one NCCL rank, so no collective runs here: the ring and the
gathers across workers are proven on gloo (tests/test_tiled_loss.py, tests/test_train.py).

Run there with ``python -m pytest -m gpu``; ``benchmarks/results/gpu_tests*.xml`` hold the
reports of the runs on a lent H200 (see docs/benchmarks.md, "A full training step on a GPU")."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.clip.model import load_model
from pipeline.clip.train import run_training

from .test_tiled_loss import check_simulated_worker
from .tiny import sampled_tiny_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("bf16", [False, True])
def test_tiled_loss_equals_clip_loss_on_cuda(bf16):
    """Rank 0 of 16 workers at a sparse head's width: fp32 (TF32 off, torch's default), and
    both losses under bf16 autocast as training runs (equal to bf16 tolerance)."""
    check_simulated_worker("cuda", workers=16, rows=64, width=16384, atol=1e-5, bf16=bf16)


@pytest.mark.parametrize("loss", ["clip", "tiled"])
def test_ray_train_trains_on_the_gpu_with_nccl_and_bf16(workdir, ray_local, loss):
    params = sampled_tiny_params(workdir, {"train.use_gpu": True, "train.num_workers": 1, "train.loss": loss})
    outcome = run_training(params, "sparse")
    assert [(w["device"], w["backend"], w["autocast"]) for w in outcome.workers] == [("cuda:0", "nccl", "bfloat16")]
    model = load_model(outcome.model_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first = torch.load(outcome.model_dir / "evolution" / "1pct.pt", weights_only=True)  # after step 1
    assert not torch.equal(first["image_head.linear.weight"], model.state_dict()["image_head.linear.weight"])
    assert model.logit_scale.item() <= math.log(50) + 1e-6
