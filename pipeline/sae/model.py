"""The sparse autoencoder itself: encoder, sparsifying activation, unit-norm decoder.

``z = sparsify((x_n - b_dec) @ W_enc + b_enc)`` and ``x_hat_n = z @ W_dec + b_dec``, where
``x_n = x * scale`` is the input rescaled so that its mean squared norm is ``d_in`` (the
Anthropic recipe): one set of hyperparameters (lr, l1_lambda) then fits any backbone, whatever
the norm of its activations. The scale is a buffer, so :meth:`encode`, :meth:`decode` and
:meth:`forward` take and return *raw* activations; training works in the normalised space.

Three sparsifiers:

* ``batchtopk`` (Bussmann et al. 2024, the supplementary's SAEs): in training keep the
  ``k * B`` largest ReLU'd pre-activations of the whole batch, so rows can use more or fewer
  than k features but the batch averages exactly k; at inference keep everything above a
  threshold learnt during training (a running average of the smallest kept activation), so a
  row's code never depends on the other rows of its batch.
* ``topk`` (Gao et al. 2024): the k largest ReLU'd pre-activations of each row.
* ``relu``: plain ReLU; sparsity comes from the L1 penalty :meth:`sparsity_penalty`.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.topk import keep_top, keep_top_of_all

KINDS = ("batchtopk", "topk", "relu")


class SparseAutoencoder(nn.Module):
    """A (d_in -> width -> d_in) sparse autoencoder with unit-norm decoder rows.

    Buffers (saved in the state dict): ``scale`` (input normalisation), ``threshold`` (BatchTopK
    inference threshold; < 0 until training has estimated it) and ``tokens_since_fired`` (per
    feature, for dead-feature handling, see :mod:`.dead`).
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        kind: str = "batchtopk",
        k: int = 30,
        l1_lambda: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind != "relu" and not 1 <= k <= width:
            raise ValueError(f"k must be in [1, width={width}], got {k}")
        if l1_lambda < 0:
            raise ValueError(f"l1_lambda must be >= 0, got {l1_lambda}")
        self.d_in, self.width, self.kind, self.k, self.l1_lambda = d_in, width, kind, k, l1_lambda

        # Gao et al.: random unit-norm decoder rows, encoder initialised to their transpose, so
        # at step 0 each feature reads the direction it writes (fewer dead features early on).
        w_dec = torch.randn(width, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(width, dtype=torch.long))

    # ---- input normalisation ---------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations -> the space the SAE works in (mean squared norm d_in)."""
        return x * self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        return x / self.scale

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor) -> float:
        """Set ``scale`` so that ``normalize(x)`` has mean squared row norm d_in; returns it."""
        mean_sq = x.float().pow(2).sum(dim=1).mean()
        self.scale.fill_(float(torch.sqrt(self.d_in / mean_sq.clamp_min(1e-12))))
        return float(self.scale)

    # ---- encoder / decoder -----------------------------------------------------------------

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """(B x width) encoder outputs before sparsification, from *normalised* inputs."""
        return (x_n - self.b_dec) @ self.W_enc + self.b_enc

    def sparsify(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations -> sparse non-negative codes (dense tensor), by ``kind``.

        BatchTopK is batch-level in training mode, thresholded in eval mode (falls back to the
        batch-level rule while no threshold has been estimated yet).
        """
        acts = torch.relu(pre)
        if self.kind == "relu":
            return acts
        if self.kind == "topk":
            return keep_top(acts, self.k, dim=1)
        if self.training or self.threshold < 0:
            return keep_top_of_all(acts, self.k * acts.shape[0], hint=0.5 * float(self.threshold))
        return acts * (acts > self.threshold)

    def decode_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Codes -> reconstruction in the normalised space."""
        return z @ self.W_dec + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (B x d_in) activations -> (B x width) sparse codes."""
        return self.sparsify(self.pre_activations(self.normalize(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B x width) codes -> raw-space (B x d_in) reconstruction."""
        return self.denormalize(self.decode_normalized(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations -> (raw-space reconstruction, codes)."""
        z = self.encode(x)
        return self.decode(z), z

    # ---- training-time pieces --------------------------------------------------------------

    def sparsity_penalty(self, z: torch.Tensor) -> torch.Tensor:
        """``l1_lambda * mean_rows sum_i z_i ||W_dec,i||`` (Anthropic's decoder-norm-weighted
        L1; with unit-norm rows it is the plain L1, but stays right if the constraint is off).
        Zero for the top-k kinds, whose sparsity is structural."""
        if self.kind != "relu" or self.l1_lambda == 0:
            return z.new_zeros(())
        return self.l1_lambda * (z * self.W_dec.norm(dim=1)).sum(dim=1).mean()

    @torch.no_grad()
    def update_threshold(self, z: torch.Tensor, momentum: float = 0.01) -> None:
        """BatchTopK: fold the smallest kept activation of a training batch into the running
        inference threshold (first call sets it), as Bussmann et al.'s reference does."""
        if self.kind != "batchtopk":
            return
        kept = z[z > 0]
        smallest = kept.min() if kept.numel() else z.new_zeros(())
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, momentum)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, before the
        optimiser step, so the step moves rows along the sphere rather than off it."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * rows).sum(dim=1, keepdim=True) * rows

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, width={self.width}, kind={self.kind!r}, k={self.k}, l1_lambda={self.l1_lambda}"


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """[d] Weiszfeld estimate of the point minimising the summed distance to the rows of x: a
    robust alternative to the mean for initialising ``b_dec`` when high-norm outliers exist."""
    point = x.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (x - point).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - point).norm() <= eps * point.norm().clamp_min(1.0):
            return new
        point = new
    return point
