"""A contrastive loss equal to open_clip's whose memory does not grow with the global batch.

``ClipLoss(local_loss=True, gather_with_grad=True)`` is what open_clip's maintainers
recommend at scale: each worker scores its local rows against the gathered columns, and
gradients flow back through the gather, so N workers reproduce the gradients of one
process on the whole batch (``tests/test_model_loss.py`` proves it on 2 gloo workers).
Its cost is the gather: every worker holds all ``global_b x width`` image and text
embeddings and, in backward, their gradients. At the paper's 32k batch and x72 width
(55,296) that is 4 x 7.2 GB in fp32 on every GPU, which is why the paper stops at x72.

:class:`TiledClipLoss` computes the same loss and the same gradients without ever holding
the gathered matrices. The other workers' ``(image, text)`` blocks travel round a ring,
one block at a time, and each worker scores its local rows against the block it holds:

* forward: every ``local_b x local_b`` tile of logits updates a streaming (online)
  logsumexp per local row; only the ``local_b`` log-normalisers are kept for backward;
* backward: the ring turns again; each tile is recomputed and turned into softmax minus
  one-hot, which gives the local rows' gradient, the logit scale's gradient, and the
  gradient of the block the worker is holding. That last one travels with the block,
  each worker adding its share, and arrives back at its owner after a full turn: the
  sum over all workers' losses that ``torch.distributed.nn.all_gather`` would deliver.

Under autocast (bf16 on GPU, as training runs) the tile products run in the autocast
dtype, like open_clip's ``image @ text.T``; everything that must be exact runs in fp32:
the logits are scaled and reduced (streaming logsumexp, the softmax of backward, the
logit scale's gradient) in fp32, and gradients accumulate in fp32. The loss then equals
open_clip's under the same autocast to bf16 rounding of the products (tested on 1, 2
and 4 gloo workers), and costs bf16 matmuls where an fp32 tile would run several times
slower on tensor cores.

Peak memory per worker is a few ``local_b x width`` blocks (the local features, the
block held, the one in flight, and one gradient accumulator) plus ``local_b x local_b``
tiles: O(local_b x width + local_b^2), independent of the global batch.
Sparse embeddings (the paper's are < 1% non-zero) can travel as (index, value) pairs:
with ``sparse_transport_density`` set, a block whose density is below it is sent as
COO and densified on arrival, exactly.

:func:`tiled_clip_loss` is the same computation in one process, with the other workers'
blocks fed in by the caller; the benchmark uses it to simulate a 32k global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from pipeline.clip.transport import Transport as _Transport

Pair = tuple[torch.Tensor, torch.Tensor]


class TiledClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` whose memory does not grow with the batch.

    Same constructor and ``forward``; same value and gradients as ``ClipLoss`` with:

    * ``world_size == 1``: any flags (there is nothing to gather);
    * ``local_loss=True, gather_with_grad=True``: the project's setting; gradients
      reach the other workers' features, as through ``torch.distributed.nn.all_gather``;
    * ``local_loss=True, gather_with_grad=False``: the gathered columns carry no
      gradient, so each worker's features only get the gradient of their own rows.

    Not supported (``NotImplementedError``): ``local_loss=False`` with several workers
    (every worker would score the whole global x global matrix, the cost this class
    exists to avoid), ``use_horovod=True`` (the ring uses ``torch.distributed``
    point-to-point ops; gloo and NCCL both work) and ``logit_bias``. ``cache_labels``
    is accepted and has no effect: no label tensor is ever built.

    Every worker must pass the same local batch size (``ClipLoss`` needs it too: its
    labels are ``arange(local_b) + rank * local_b``), and ``rank``/``world_size`` must
    be those of the default process group.

    ``sparse_transport_density`` (None: always dense): a block whose fraction of
    non-zeros is below it travels as flat indices + values (int32 + fp32 per non-zero,
    so it moves fewer bytes below 0.5, but counting, encoding and densifying cost three
    passes over the block: on gloo it was slower at every density down to 0.005,
    ``benchmarks/sparse_transport.py``); ``transport.stats`` counts blocks and bytes.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        sparse_transport_density: float | None = None,
    ):
        super().__init__()
        if world_size > 1 and not local_loss:
            raise NotImplementedError(
                "TiledClipLoss needs local_loss=True when world_size > 1: with "
                "local_loss=False every worker scores the full global x global logits"
            )
        if use_horovod:
            raise NotImplementedError(
                "TiledClipLoss passes blocks with torch.distributed point-to-point ops; "
                "use_horovod=True is not supported"
            )
        if sparse_transport_density is not None and not 0 <= sparse_transport_density:
            raise ValueError("sparse_transport_density must be >= 0 or None")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.transport = _Transport(sparse_transport_density)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        if logit_bias is not None:
            raise NotImplementedError("TiledClipLoss does not support logit_bias")
        if self.world_size == 1:
            exchange, column_grads = _LocalExchange(()), True
        else:
            exchange = _RingExchange(self.rank, self.world_size, self.transport)
            column_grads = self.gather_with_grad
        loss = _apply(
            image_features, text_features, logit_scale, exchange, column_grads
        )
        return {"contrastive_loss": loss} if output_dict else loss


def tiled_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    other_blocks: Sequence[Pair] | Callable[[], Iterable[Pair]] = (),
    remote_grad: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One worker's tiled loss in a single process, the other workers' blocks fed in.

    Equals the ``local_loss`` contrastive loss of the local rows against the batch
    ``cat([local, *other_blocks])``, computed with the same code as
    :class:`TiledClipLoss`. ``other_blocks`` is read once in forward and once in
    backward, so it is a sequence of ``(image, text)`` pairs or a callable returning a
    fresh iterable (a generator that makes blocks on the fly keeps memory at one block).
    In backward, the gradient of block ``i`` (what the ring would send back to its
    owner) goes to ``remote_grad(i, d_image, d_text)`` if given, else is dropped.
    """
    exchange = _LocalExchange(other_blocks, remote_grad)
    return _apply(image_features, text_features, logit_scale, exchange, True)


class _Exchange(Protocol):
    """Where blocks come from and where their gradients go (local list or ring)."""

    def blocks(self, own: Pair) -> Iterator[Pair]:
        """Every worker's block once, the caller's own first."""

    def push_grad(self, grad: Pair) -> None:
        """The gradient of the block last yielded by :meth:`blocks`."""

    def own_grad(self) -> Pair:
        """The summed gradient of the caller's own block, after every push."""


def _apply(image, text, logit_scale, exchange: _Exchange, column_grads: bool):
    """Run the autograd function; a float logit scale becomes a constant tensor."""
    if image.shape != text.shape:
        raise ValueError(
            f"image {tuple(image.shape)} and text {tuple(text.shape)} differ"
        )
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(logit_scale, device=image.device)
    return _TiledClip.apply(image, text, logit_scale, exchange, column_grads)


class _TiledClip(torch.autograd.Function):
    """The tiled loss: streaming logsumexp forward, tile recomputation backward.

    Autocast is switched off inside; its dtype, read in forward (backward runs outside
    any autocast region), becomes the dtype of the tile products in both passes, so the
    logits recomputed in backward are bit for bit those the normalisers came from.
    Blocks travel in the features' own dtype and are cast tile by tile.
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, exchange, column_grads):
        products = _Products.under_autocast(image)
        with _no_autocast(image):
            loss, lse_img, lse_txt = _loss_forward(
                image, text, logit_scale, exchange, products
            )
        ctx.save_for_backward(image, text, logit_scale, lse_img, lse_txt)
        ctx.exchange, ctx.column_grads, ctx.products = exchange, column_grads, products
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        image, text, logit_scale, lse_img, lse_txt = ctx.saved_tensors
        with _no_autocast(image):
            coef = _compute(grad_loss) / (2 * image.shape[0])
            d_img, d_txt, d_scale = _loss_backward(
                image, text, logit_scale, (lse_img, lse_txt), coef, ctx
            )
        return (
            d_img.to(image.dtype),
            d_txt.to(text.dtype),
            d_scale.to(logit_scale.dtype).reshape(logit_scale.shape),
            None,
            None,
        )


def _compute(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: a half-precision logsumexp or accumulator would be inexact."""
    return t.to(_compute_dtype(t))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _no_autocast(like: torch.Tensor):
    return torch.autocast(like.device.type, enabled=False)


class _Products:
    """The matrix products of the tiles, in fp32 or in autocast's dtype.

    ``dtype=None``: operands in their compute dtype (fp32 or fp64). With a dtype (bf16
    or fp16): operands cast to it, the product returned in fp32 -- what a tensor-core
    matmul under autocast computes (fp32 accumulation, half-precision inputs) before
    the fp32 reductions that follow.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    @classmethod
    def under_autocast(cls, like: torch.Tensor) -> _Products:
        """Autocast's dtype if it is on for ``like``'s device (fp64 features stay fp64)."""
        device = like.device.type
        if like.dtype == torch.float64 or not torch.is_autocast_enabled(device):
            return cls(None)
        return cls(torch.get_autocast_dtype(device))

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the products take it: cast once, reused for every tile."""
        return _compute(t) if self.dtype is None else t.to(self.dtype)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` of two operands, in fp32 (or fp64)."""
        product = a.to(b.dtype) @ b if self.dtype is not None else a @ b
        return _compute(product)


def _loss_forward(image, text, logit_scale, exchange: _Exchange, products: _Products):
    """Loss and per-row log-normalisers, one block of columns at a time.

    The positive logits are the own tile's diagonal, from the same products as the
    normalisers (as open_clip reads them off its logits matrix).
    """
    img, txt = products.operand(image), products.operand(text)
    scale = _compute(logit_scale)
    lse_img = image.new_full((image.shape[0],), float("-inf"), dtype=_compute_dtype(image))
    lse_txt = lse_img.clone()
    positive = None
    for other_img, other_txt in exchange.blocks((image, text)):
        raw_it = products(img, products.operand(other_txt).T)
        raw_ti = products(txt, products.operand(other_img).T)
        if positive is None:
            positive = scale * raw_it.diagonal()
        lse_img = torch.logaddexp(lse_img, (scale * raw_it).logsumexp(1))
        lse_txt = torch.logaddexp(lse_txt, (scale * raw_ti).logsumexp(1))
    loss = ((lse_img - positive).mean() + (lse_txt - positive).mean()) / 2
    return loss, lse_img, lse_txt


def _loss_backward(image, text, logit_scale, lse: Pair, coef, ctx):
    """Gradients of the local rows, of the logit scale and (pushed) of every block.

    Gradients accumulate in fp32 whatever the products' dtype; each tile's share is
    one product in that dtype, as autocast's backward of ``image @ text.T`` would be.
    """
    products, exchange, column_grads = ctx.products, ctx.exchange, ctx.column_grads
    img, txt = products.operand(image), products.operand(text)
    scale = _compute(logit_scale)
    d_img = torch.zeros_like(image, dtype=_compute_dtype(image))
    d_txt = torch.zeros_like(text, dtype=_compute_dtype(text))
    d_scale = scale.new_zeros(())
    for step, (other_img, other_txt) in enumerate(exchange.blocks((image, text))):
        other_img, other_txt = products.operand(other_img), products.operand(other_txt)
        own = step == 0
        g_it, s_it = _tile_grad(products(img, other_txt.T), scale, lse[0], coef, own)
        g_ti, s_ti = _tile_grad(products(txt, other_img.T), scale, lse[1], coef, own)
        d_img += products(g_it, other_txt)
        d_txt += products(g_ti, other_img)
        d_scale += s_it + s_ti
        if column_grads:
            exchange.push_grad((products(g_ti.T, txt), products(g_it.T, img)))
    if column_grads:
        own_img, own_txt = exchange.own_grad()
        d_img += own_img
        d_txt += own_txt
    return d_img, d_txt, d_scale


def _tile_grad(raw, scale, lse, coef, own: bool):
    """d loss / d(rows @ cols.T) for one tile of products ``raw``, and the tile's share
    of d loss / d scale.

    The cross-entropy gradient is softmax minus one-hot; the softmax of the tile is
    exp(logits - lse) with the normalisers of the whole row, kept from forward.
    """
    d_logits = torch.exp(scale * raw - lse[:, None]) * coef
    if own:
        d_logits.diagonal().sub_(coef)
    return d_logits * scale, (d_logits * raw).sum()


class _LocalExchange:
    """Blocks from the caller (world_size 1, or the single-process simulation)."""

    def __init__(self, others, sink=None):
        self.others, self.sink = others, sink
        self.pushed, self.own = 0, None

    def blocks(self, own: Pair) -> Iterator[Pair]:
        self.pushed, self.own = 0, None
        yield own
        yield from self.others() if callable(self.others) else self.others

    def push_grad(self, grad: Pair) -> None:
        if self.pushed == 0:
            self.own = grad
        elif self.sink is not None:
            self.sink(self.pushed - 1, *grad)
        self.pushed += 1

    def own_grad(self) -> Pair:
        return self.own


class _RingExchange:
    """Blocks travel rank r -> r + 1, so after W - 1 hops each worker saw every block.

    The next block is already in flight while the caller computes on the current one.
    In backward, a block's gradient accumulator follows the block round the ring: each
    worker adds its share and passes it on; after W hops it is back at its owner. An
    accumulator is awaited only when the share it needs is ready, so it too travels
    while the next tile is computed.
    """

    def __init__(self, rank: int, world_size: int, transport: _Transport):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TiledClipLoss with world_size > 1 needs torch.distributed"
            )
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(
                f"TiledClipLoss(rank={rank}, world_size={world_size}) but the process "
                f"group has rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        self.world_size, self.transport = world_size, transport
        self.next, self.prev = (rank + 1) % world_size, (rank - 1) % world_size
        self.incoming_grad: Callable[[], torch.Tensor] | None = None

    def blocks(self, own: Pair) -> Iterator[Pair]:
        self.incoming_grad = None
        current = own
        for step in range(self.world_size):
            last = step == self.world_size - 1
            pending = None if last else self._shift(current, _DATA_TAG)
            yield current
            if pending is not None:
                current = _unstack(pending())

    def push_grad(self, grad: Pair) -> None:
        if self.incoming_grad is not None:
            acc = _unstack(self.incoming_grad())
            grad = (acc[0] + grad[0], acc[1] + grad[1])
        self.incoming_grad = self._shift(grad, _GRAD_TAG)

    def own_grad(self) -> Pair:
        return _unstack(self.incoming_grad())

    def _shift(self, pair: Pair, tag: int) -> Callable[[], torch.Tensor]:
        return self.transport.shift(torch.cat(pair), self.next, self.prev, tag)


def _unstack(block: torch.Tensor) -> Pair:
    image, text = block.chunk(2)
    return image, text


_DATA_TAG, _GRAD_TAG = 0, 1
