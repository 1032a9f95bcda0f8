"""Calibration statistics of one linear layer: the layer-wise Hessian H = 2 X Xᵀ / N and what is derived from it.

For the layer-wise reconstruction problem min ||W X - W' X||²_F (Frantar & Alistarh 2023, arXiv 2301.00774,
section 3) the Hessian with respect to each output row is H = 2 X Xᵀ, X the layer's inputs (in_features x N
tokens). It also gives Wanda's input-feature norms ||X_j||₂ (its diagonal) and every method's relative
reconstruction error without keeping X.
"""

from __future__ import annotations

import logging

import torch

from modelzoo.errors import ModelZooError

log = logging.getLogger(__name__)

DAMPENING_RETRIES = 4  # attempts after the first, each with 10x the dampening


class HessianError(ModelZooError, RuntimeError):
    """The damped Hessian could not be factorised even at the highest dampening tried."""


class InputStats:
    """Running X Xᵀ over the inputs a linear layer sees, in float32 on the device of its first input.

    Args:
        columns: the layer's input features.
    """

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs, (..., columns): every leading index is a token."""
        x = x.detach().reshape(-1, self.columns).float()  # (tokens, in)
        if self.xtx is None:
            self.xtx = torch.zeros(self.columns, self.columns, device=x.device)
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X Xᵀ / N, (in, in)."""
        return self._seen() * (2.0 / self.tokens)

    def input_norms(self) -> torch.Tensor:
        """||X_j||₂ of every input feature j over all calibration tokens, (in,)."""
        return self._seen().diagonal().sqrt()

    def _seen(self) -> torch.Tensor:
        if self.xtx is None:
            raise ValueError("no calibration inputs reached this layer")
        return self.xtx


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F from H = 2 X Xᵀ / N, as ||A X||²_F = N/2 tr(A H Aᵀ); weights (out, in)."""
    delta = (weight - pruned).float()
    weight = weight.float()
    num = ((delta @ hessian) * delta).sum()
    den = ((weight @ hessian) * weight).sum()
    return float((num.clamp_min(0) / den).sqrt()) if den > 0 else 0.0


def inverse_cholesky(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor U of (H + λI)⁻¹ = Uᵀ U, λ = `dampening` x mean(diag H), which SparseGPT needs.

    The reference code factorises, inverts and factorises again. With J the order-reversing permutation and
    J (H + λI) J = M Mᵀ (lower Cholesky), (H + λI)⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J), and J M⁻¹ J is upper triangular with
    a positive diagonal, so it is U: one factorisation and one triangular inverse, an order of magnitude faster
    on CPU than `cholesky_inverse`. When the factorisation fails (H singular or not positive definite in
    floating point), the dampening is raised 10x and tried again, up to `DAMPENING_RETRIES` times.

    Args:
        hessian: (in, in), symmetric positive semi-definite; not modified.
        dampening: fraction of the mean diagonal added to the diagonal.

    Returns:
        U (upper triangular) and the dampening fraction that worked.

    Raises:
        HessianError: no dampening up to `dampening * 10**DAMPENING_RETRIES` gave a positive definite matrix.
    """
    mean_diag = hessian.diagonal().mean()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    flipped = hessian.flip(0, 1)
    for attempt in range(DAMPENING_RETRIES + 1):
        fraction = dampening * 10**attempt
        lower, info = torch.linalg.cholesky_ex(flipped + fraction * mean_diag * identity)
        if info == 0:
            upper = torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper, fraction
        log.warning("Cholesky factorisation failed at dampening %g; retrying at %g", fraction, fraction * 10)
    raise HessianError(
        f"the Hessian is not positive definite even at dampening {fraction:g} x its mean diagonal "
        f"({mean_diag:.3g}); the calibration inputs may hold inf/NaN, or raise task.dampening"
    )
