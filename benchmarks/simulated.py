"""One worker of a large data-parallel job, in one process: the other workers' embeddings fed in.

A benchmark (or a GPU test) plays rank 0 of ``workers`` workers: it owns the local batch, and
every other worker's ``(image, text)`` block is a seeded function of its index, made on demand.
Both contrastive losses then see what a real worker sees:

* :func:`clip_loss` is open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` itself,
  its all_gather replaced by a concatenation of the blocks, so the gathered
  ``global x width`` matrices (and, in backward, their gradients) live as they would;
* :func:`tiled_loss` is :func:`pipeline.clip.tiled_loss.tiled_clip_loss`, the code of TiledClipLoss's ring,
  which makes the blocks one at a time in forward and again in backward.

:class:`SimulatedContrastive` wraps either as the contrastive term of
:class:`pipeline.clip.loss.SparseClipObjective`, for a whole training step at a simulated global batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from pipeline.clip.loss import LOSSES
from pipeline.clip.tiled_loss import Pair, tiled_clip_loss


def make_block(index: int, rows: int, width: int, density: float, device: str | torch.device,
               dtype: torch.dtype = torch.float32) -> Pair:
    """Image and text embeddings of worker ``index``: ReLU'd Gaussians with ``density`` non-zero,
    L2-normalised (a row left with no non-zero stays zero), the same for the same index on every call."""
    gen = torch.Generator(device).manual_seed(index)
    cut = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - density)).item() if density < 1 else None
    pair = []
    for _ in range(2):
        x = torch.randn(rows, width, generator=gen, device=device)
        pair.append(F.normalize(F.relu(x - cut) if cut is not None else x, dim=-1).to(dtype))
    return pair[0], pair[1]


def other_blocks(workers: int, rows: int, width: int, density: float, device: str | torch.device,
                 dtype: torch.dtype = torch.float32) -> Callable[[], Iterator[Pair]]:
    """A callable that makes workers 1..W-1's blocks afresh, one at a time, on every call."""

    def blocks() -> Iterator[Pair]:
        for index in range(1, workers):
            yield make_block(index, rows, width, density, device, dtype)

    return blocks


def generation_ms(blocks: Callable[[], Iterator[Pair]], device: str | torch.device, repeats: int = 3) -> float:
    """Median wall time of making every block once: the simulation's own cost, which benchmarks
    subtract from a step's time (a median, since a single timing of hundreds of small launches
    is noisy)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in blocks():
            pass
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
              others: Callable[[], Iterator[Pair]], workers: int) -> torch.Tensor:
    """open_clip's ClipLoss for rank 0 of ``workers``, its gather a concatenation of the blocks."""

    def gather(image_features, text_features, **_):
        blocks = [(image_features, text_features), *others()]
        return tuple(torch.cat(column) for column in zip(*blocks, strict=True))

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=workers)
    with mock.patch("open_clip.loss.gather_features", gather):
        return loss_fn(image, text, scale)


def tiled_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
               others: Callable[[], Iterator[Pair]], workers: int) -> torch.Tensor:
    """TiledClipLoss's computation for rank 0, the other blocks made as the ring would bring them."""
    return tiled_clip_loss(image, text, scale, others)


def loss_fn(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise ValueError(f"loss {name!r}: expected one of {', '.join(LOSSES)}")
    return clip_loss if name == "clip" else tiled_loss


class SimulatedContrastive(nn.Module):
    """A contrastive term for SparseClipObjective at a simulated global batch.

    The other ``workers - 1`` blocks take the local features' shape, dtype and device, and
    ``density`` non-zeros (0.01: a trained Sparse CLIP's; the same value is used for the dense
    baseline's blocks, where it changes neither memory nor time).
    """

    def __init__(self, loss: str, workers: int, density: float):
        super().__init__()
        self.loss, self.workers, self.density = loss_fn(loss), workers, density

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, width = image.shape
        others = other_blocks(self.workers, rows, width, self.density, image.device, image.dtype)
        return self.loss(image, text, scale, others, self.workers)
