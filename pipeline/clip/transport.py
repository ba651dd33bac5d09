"""Point-to-point block shifts for the tiled loss's ring, dense or as (index, value) pairs.

Only torch here (no open_clip): ``benchmarks/sparse_transport.py`` times these shifts in worker
processes that should not pay open_clip's import (6 s here) each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class Transport:
    """Point-to-point block shifts, dense or as (index, value) pairs.

    Every worker's blocks have the same shape and dtype, so a dense block needs no
    header. With ``density`` set, a one-number header goes first: -1 for a dense
    block, else the count of non-zeros that follow as flat indices and values.
    ``stats`` counts the blocks sent each way and the bytes they took.
    """

    def __init__(self, density: float | None):
        self.density = density
        self.stats = {"dense_blocks": 0, "sparse_blocks": 0, "bytes_sent": 0}

    def shift(self, block, dst: int, src: int, tag: int) -> Callable[[], torch.Tensor]:
        """Send ``block`` to ``dst``, receive ``src``'s; returns a wait-and-get."""
        if self.density is None:
            self._count([block])
            return _post([block], [torch.empty_like(block)], dst, src, tag, block)
        nnz = int(torch.count_nonzero(block))
        sparse = nnz < self.density * block.numel()
        header = torch.tensor([nnz if sparse else -1], device=block.device)
        incoming = torch.empty_like(header)
        _post([header], [incoming], dst, src, 4 * tag + 2, header)()
        sends = _encode(block) if sparse else [block]
        self._count([header, *sends])
        recvs = _receive_buffers(int(incoming), block)
        return _post(sends, recvs, dst, src, 4 * tag, block)

    def _count(self, sends: list[torch.Tensor]) -> None:
        self.stats["sparse_blocks" if len(sends) == 3 else "dense_blocks"] += 1
        self.stats["bytes_sent"] += sum(t.numel() * t.element_size() for t in sends)


def _post(sends, recvs, dst: int, src: int, tag: int, like: torch.Tensor):
    """Post sends and receives together (NCCL needs them batched); return a waiter.

    Each message of a shift has its own tag, so gloo cannot mix them up; NCCL ignores
    tags and matches in posting order, which is the same on every worker.
    """
    ops = [dist.P2POp(dist.isend, t, dst, tag=tag + i) for i, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, t, src, tag=tag + i) for i, t in enumerate(recvs)]
    works = dist.batch_isend_irecv(ops)

    def wait() -> torch.Tensor:
        for work in works:
            work.wait()
        return _decode(*recvs, like) if len(recvs) == 2 else recvs[0]

    return wait


def _index_dtype(block: torch.Tensor) -> torch.dtype:
    return torch.int32 if block.numel() < 2**31 else torch.int64


def _encode(block: torch.Tensor) -> list[torch.Tensor]:
    """COO of a block: flat indices of its non-zeros, then their values."""
    flat = block.reshape(-1)
    index = flat.nonzero().squeeze(1)
    return [index.to(_index_dtype(block)), flat[index]]


def _receive_buffers(header: int, like: torch.Tensor) -> list[torch.Tensor]:
    if header < 0:
        return [torch.empty_like(like)]
    index = torch.empty(header, dtype=_index_dtype(like), device=like.device)
    return [index, torch.empty(header, dtype=like.dtype, device=like.device)]


def _decode(index, values, like: torch.Tensor) -> torch.Tensor:
    """Densify a COO block (exact: every value lands where it was)."""
    dense = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    dense[index.long()] = values
    return dense.view_as(like)
