"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): one-shot pruning by approximate OBS reconstruction.

With H = sum_t x_t x_t^T over the calibration inputs (dampened by 1 % of its mean diagonal), columns are
processed left to right in lazy blocks of 128. Inside a block the mask is chosen adaptively by the OBS
saliency w^2 / [H^-1]_jj^2; each pruned weight's error is spread over the not-yet-processed columns through
the upper Cholesky factor of H^-1, so the surviving weights reconstruct the layer's output.
"""

from __future__ import annotations

import logging

import torch

from ..config import Pattern
from ..errors import LLMPruneError
from ..masks import apply_mask_, lowest_k
from .base import LayerStats, PruneResult, Scorer, register_scorer

log = logging.getLogger(__name__)


def sparsegpt_inverse_hessian(hessian: torch.Tensor, percdamp: float = 0.01):
    """Upper Cholesky factor of (H + damp I)^-1, float32, and the mask of dead inputs (H_jj == 0).

    Returns (hinv_upper (in, in), dead (in,) bool). If H is not positive definite at 1 % dampening, the
    dampening is raised tenfold (up to three times) with a warning."""
    H = hessian.float().clone()  # (in, in)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    mean_diag = H.diagonal().mean()
    damp = percdamp
    for attempt in range(4):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U, dead
        if attempt < 3:
            log.warning("Hessian not positive definite at dampening %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise LLMPruneError(
        f"SparseGPT: the calibration Hessian is not positive definite even with {damp / 10:g} dampening; "
        "use more calibration samples or a higher --sparsegpt-percdamp"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    dead: torch.Tensor,
    pattern: Pattern,
    group: str = "per-layer",
    blocksize: int = 128,
) -> PruneResult:
    """Prune `weight` (out, in) with OBS updates. Returns the updated float32 weight and its mask.

    Unstructured: in each lazy block, the `int(sparsity * size)` lowest saliencies of the block
    (`per-layer`: across all rows, the reference; `per-row`: within each row) are pruned.
    N:M: every M columns, the M-N lowest saliencies of each row are pruned, using the already-updated weights.
    """
    W = weight.float().clone(memory_format=torch.contiguous_format)  # (out, in)
    rows, cols = W.shape
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv_upper[i1:i2, i1:i2]  # (count, count)
        d = Hinv1.diagonal()  # (count,)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            sal = W1.square() / d.square().unsqueeze(0)  # (out, count)
            if group == "per-layer":
                k = int(sal.numel() * pattern.sparsity)
                if k:
                    mask1.view(-1)[lowest_k(sal.reshape(-1), k, 0)] = True
            else:
                k = int(count * pattern.sparsity)
                if k:
                    mask1.scatter_(1, lowest_k(sal, k, 1), True)
        n, m = pattern.n, pattern.m
        for i in range(count):
            w = W1[:, i]
            if pattern.kind == "nm" and i % m == 0:
                sal = W1[:, i : i + m].square() / d[i : i + m].square().unsqueeze(0)  # (out, M)
                idx = lowest_k(sal, m - n, 1)
                mask1[:, i : i + m].scatter_(1, idx, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]  # (out,)
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:].sub_(Err1.matmul(hinv_upper[i1:i2, i2:]))
    apply_mask_(W, mask)
    return PruneResult(mask=mask, weight=W)


@register_scorer("sparsegpt")
class SparseGPT(Scorer):
    needs = "hessian"
    default_group = "per-layer"

    def __init__(self, config=None):
        super().__init__(config)
        self._cached: tuple[LayerStats, tuple[torch.Tensor, torch.Tensor]] | None = None

    def inverse_hessian(self, stats: LayerStats):
        # Layers that read the same input (q/k/v, gate/up) share one LayerStats: factor its Hessian once.
        if self._cached is None or self._cached[0] is not stats:
            percdamp = self.config.sparsegpt_percdamp if self.config is not None else 0.01
            self._cached = (stats, sparsegpt_inverse_hessian(stats.hessian, percdamp))
        return self._cached[1]

    def end_block(self) -> None:
        self._cached = None  # the factor of the block's Hessians is not needed any more

    def prune(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern, group: str) -> PruneResult:
        if pattern.kind == "unstructured" and pattern.sparsity == 0:
            return PruneResult(torch.zeros(weight.shape, dtype=torch.bool, device=weight.device))  # a no-op
        hinv, dead = self.inverse_hessian(stats)
        blocksize = self.config.sparsegpt_blocksize if self.config is not None else 128
        return sparsegpt_prune(weight, hinv, dead, pattern, group, blocksize)
