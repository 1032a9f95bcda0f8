"""SparseGPT: one-shot pruning by approximate second-order reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

Columns (input features) of W (out, in) are visited left to right. Pruning column i leaves an error that the
optimal brain surgeon (OBS) update spreads over the columns not yet visited, using row i of the upper Cholesky
factor of H⁻¹ (section 3.2-3.3 and Algorithm 1 of the paper, and the authors' reference `fasterprune`):

- lazy batch updates: inside a block of `block_size` columns updates are applied column by column; the
  columns to the right of the block receive the block's accumulated errors in one matrix product;
- adaptive mask selection (unstructured): at the start of each block the weights with the smallest OBS
  saliency w² / [H⁻¹]²_jj are pruned, jointly over all rows of the block, so rows and columns may end up with
  different sparsity while the block (and the layer) hit the target exactly;
- N:M: in every run of m input columns the m - n smallest saliencies of each row are pruned, chosen when the
  run is reached (so from weights the earlier updates have already moved).

With `update_weights=False` the same masks are chosen from the unchanged weights and nothing is updated
(the mask-only variant of the paper's ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelzoo.prune.hessian import inverse_cholesky
from modelzoo.sparsity.masks import num_kept


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in), float32, zero outside `mask`
    mask: torch.Tensor  # (out, in), bool, True = kept
    dampening: float  # the dampening fraction the Cholesky factorisation succeeded with


def pruned_count(rows: int, columns: int, sparsity: float) -> int:
    """Weights pruned among the first `columns` columns of `rows` rows (cstorch's float32 counting rule)."""
    return rows * columns - num_kept(rows * columns, sparsity)


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    update_weights: bool = True,
) -> SparseGPTResult:
    """Prune one linear layer's weight with SparseGPT.

    Args:
        weight: (out, in); not modified.
        hessian: (in, in), H = 2 X Xᵀ / N of the layer's calibration inputs.
        sparsity: fraction of zeros (ignored with `pattern`).
        pattern: `(n, m)`: keep n of every m consecutive input weights; `block_size` must be a multiple of m.
        block_size: columns per lazy-update block (the reference uses 128).
        dampening: fraction of the mean Hessian diagonal added before inverting (retried 10x higher on failure).
        update_weights: apply the OBS updates; False only selects the mask.

    Returns:
        The pruned weight (float32), its mask and the dampening used.
    """
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)  # (rows, cols)
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: their weights act on nothing
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv, used = inverse_cholesky(H, dampening)  # upper triangular, (cols, cols)

    mask = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()  # (B,)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if pattern is None:
            k = pruned_count(rows, i2, sparsity) - pruned_count(rows, i1, sparsity)
            saliency = (W1**2 / d**2).flatten()
            mask1.view(-1)[torch.topk(saliency, k, largest=False, sorted=False).indices] = False
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2  # (rows, m)
                drop = torch.topk(saliency, m - n, dim=1, largest=False, sorted=False).indices
                mask1[:, i : i + m].scatter_(1, drop, False)
            w = W1[:, i]
            q = w * mask1[:, i]
            err = (w - q) / d[i]
            if update_weights:
                W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        if update_weights:
            W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
    return SparseGPTResult(W.mul_(mask), mask, used)
