"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): one-shot pruning by approximate OBS reconstruction.

With H = sum_t x_t x_t^T over the calibration inputs (dampened by 1 % of its mean diagonal), columns are
processed left to right in lazy blocks of 128. Inside a block the mask is chosen adaptively by the OBS
saliency w^2 / [H^-1]_jj^2; each pruned weight's error is spread over the not-yet-processed columns through
the upper Cholesky factor of H^-1, so the surviving weights reconstruct the layer's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import LLMPruneError
from ..masks import Pattern, apply_mask_, reference_unstructured_mask, unstructured_mask
from . import sparsegpt_triton
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


def _obs_columns(W1t: torch.Tensor, Hs: torch.Tensor, inv_d: torch.Tensor, scale_t: torch.Tensor,
                 mask_t: torch.Tensor, Err1t: torch.Tensor, n: int, m: int, d: torch.Tensor | None = None) -> None:
    """The sequential part of one lazy block, in place, in transposed layout (columns are rows here).

    W1t (count, out): the block's weights; Hs (count, count): the strictly upper part of the block of the
    Cholesky factor; inv_d (count,): 1 / its diagonal; mask_t (count, out): True = pruned (filled here every M
    columns for N:M when m > 0); scale_t (count, out): mask / d (filled here for N:M). For each column i, the
    error e = w_i * [pruned] / d_i (OBS: (w - q) / [H^-1]_ii) goes to Err1t[i] and is spread over the later
    columns, W1t[j] -= Hs[i, j] * e for j > i. Column i itself is not updated, so it keeps the value it was pruned from.
    Every shape is fixed, so the loop can be captured in a CUDA graph. `d` (count,), the factor's diagonal, is the
    reference selection: the N:M saliency is then computed as the reference code does, w^2 / d^2, and `torch.topk`
    picks the M-N lowest of each group."""
    count = W1t.shape[0]
    for i in range(count):
        if m and i % m == 0:
            blk = W1t[i : i + m]  # (M, out)
            if d is None:
                sal = blk.square() * inv_d[i : i + m].square().unsqueeze(1)  # w^2 / d^2
                idx = torch.topk(sal, m - n, dim=0, largest=False, sorted=False).indices  # (M-N, out)
            else:  # the references' arithmetic and call
                sal = blk.square() / d[i : i + m].square().unsqueeze(1)
                idx = torch.topk(sal, m - n, dim=0, largest=False).indices
            mask_t[i : i + m].zero_().scatter_(0, idx, True)
            torch.mul(mask_t[i : i + m], inv_d[i : i + m].unsqueeze(1), out=scale_t[i : i + m])
        torch.mul(W1t[i], scale_t[i], out=Err1t[i])
        if i + 1 < count:  # only the later columns change (Hs is strictly upper triangular)
            W1t[i + 1 :].addr_(Hs[i, i + 1 :], Err1t[i], alpha=-1.0)


class _GraphedColumns:
    """`_obs_columns` captured once per (count, out, N:M) shape in a CUDA graph and replayed for every lazy
    block of that shape: one launch instead of thousands of small kernels and their Python overhead."""

    def __init__(self, count: int, rows: int, n: int, m: int, device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        self.W1t, self.Hs = torch.zeros(count, rows, **f32), torch.zeros(count, count, **f32)
        self.inv_d, self.scale_t = torch.ones(count, **f32), torch.zeros(count, rows, **f32)
        self.Err1t = torch.zeros(count, rows, **f32)
        self.mask_t = torch.zeros(count, rows, dtype=torch.bool, device=device)
        self.n, self.m = n, m
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # block transfers go on meanwhile
            self._run()

    def _run(self) -> None:
        _obs_columns(self.W1t, self.Hs, self.inv_d, self.scale_t, self.mask_t, self.Err1t, self.n, self.m)

    def __call__(self, W1t, Hs, inv_d, scale_t, mask_t):
        self.W1t.copy_(W1t)
        self.Hs.copy_(Hs)
        self.inv_d.copy_(inv_d)
        self.scale_t.copy_(scale_t)
        self.mask_t.copy_(mask_t)
        self.graph.replay()
        return self.W1t, self.mask_t, self.Err1t  # valid until the next call


def _reference_lazy_block_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """The reference code's mask of one lazy block, W1 (out, count) as the block starts, d (count,) the diagonal
    of its block of the Cholesky factor: saliency w^2 / d^2 computed as the reference does, then its rule
    (`per-layer`: every saliency <= the one at sorted index k, ties included; `per-row`: a stable sort per row)."""
    sal = W1.square() / d.square().unsqueeze(0)  # (out, count)
    return reference_unstructured_mask(sal, sparsity, group)


def _lazy_block_triton(W, i1, i2, hinv_upper, pattern, group, mask, selection="exact") -> torch.Tensor:
    """One lazy block through the Triton kernel (W updated in place, mask filled); returns its errors. Reference
    selection: unstructured only (its mask is chosen here, before the kernel; N:M is chosen inside it)."""
    count = i2 - i1
    Hinv1 = hinv_upper[i1:i2, i1:i2]  # (count, count)
    inv_d = Hinv1.diagonal().reciprocal()  # (count,)
    Hs = Hinv1.triu(1)
    if pattern.kind == "nm":
        err, mk = sparsegpt_triton.obs_block_(W, i1, count, Hs, inv_d, None, (pattern.n, pattern.m))
        mask[:, i1:i2] = mk
        return err
    if selection == "reference":
        mask1 = _reference_lazy_block_mask(W[:, i1:i2], Hinv1.diagonal(), pattern.sparsity, group)
    else:
        sal = W[:, i1:i2].square() * inv_d.square()  # (out, count): w^2 / [H^-1]_jj^2
        mask1 = unstructured_mask(sal, pattern.sparsity, group)
    scale = torch.where(mask1, inv_d, 0.0)  # (out, count): [pruned] / d
    err, _ = sparsegpt_triton.obs_block_(W, i1, count, Hs, inv_d, scale, None)
    mask[:, i1:i2] = mask1
    return err


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    dead: torch.Tensor,
    pattern: Pattern,
    group: str = "per-layer",
    blocksize: int = 128,
    graphs: dict | None = None,
    use_triton: bool | None = None,
    selection: str = "exact",
) -> PruneResult:
    """Prune `weight` (out, in) with OBS updates. Returns the updated float32 weight and its mask.

    Unstructured: in each lazy block, the `int(sparsity * size)` lowest saliencies of the block
    (`per-layer`: across all rows, the reference; `per-row`: within each row) are pruned.
    N:M: every M columns, the M-N lowest saliencies of each row are pruned, using the already-updated weights.
    The column loop runs as one Triton kernel per lazy block where it covers the case (`use_triton`: None =
    where available; see sparsegpt_triton), else captured in CUDA graphs cached in `graphs` (a dict; on CUDA),
    else eagerly.
    `selection="reference"`: each mask is chosen by the reference code's rule and arithmetic from the same
    block weights (unstructured `per-layer`: every saliency <= the one at sorted index k, ties included); N:M
    then runs the eager loop (neither the Triton kernel nor a CUDA graph), unstructured keeps the kernel.
    """
    W = weight.float().clone(memory_format=torch.contiguous_format)  # (out, in)
    rows, cols = W.shape
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    nm = pattern.kind == "nm"
    n, m = (pattern.n, pattern.m) if nm else (0, 0)
    reference = selection == "reference"
    if reference and nm:
        use_triton, graphs = False, None  # the kernel chooses N:M masks itself, by its own tie rule
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        if use_triton is not False and sparsegpt_triton.available(W, count, (n, m) if nm else None):
            err = _lazy_block_triton(W, i1, i2, hinv_upper, pattern, group, mask, selection)
            if i2 < cols:
                W[:, i2:].sub_(err.matmul(hinv_upper[i1:i2, i2:]))
            continue
        W1t = W[:, i1:i2].t().contiguous()  # (count, out)
        Hinv1 = hinv_upper[i1:i2, i1:i2]  # (count, count)
        inv_d = Hinv1.diagonal().reciprocal()  # (count,)
        mask_t = torch.zeros_like(W1t, dtype=torch.bool)
        scale_t = torch.zeros_like(W1t)
        if not nm and reference:
            mask_t = _reference_lazy_block_mask(W1t.t(), Hinv1.diagonal(), pattern.sparsity, group).t().contiguous()
            torch.mul(mask_t, inv_d.unsqueeze(1), out=scale_t)
        elif not nm:
            sal = W1t.square() * inv_d.square().unsqueeze(1)  # (count, out): w^2 / [H^-1]_jj^2
            mask_t = unstructured_mask(sal, pattern.sparsity, group, dim=0)  # inputs along dim 0 here
            torch.mul(mask_t, inv_d.unsqueeze(1), out=scale_t)
        Hs = Hinv1.triu(1)
        graph = None
        if graphs is not None and W.is_cuda and (not nm or count % m == 0):
            key = (count, rows, n, m)
            if key not in graphs:
                try:
                    graphs[key] = _GraphedColumns(count, rows, n, m, W.device)
                except Exception as e:  # noqa: BLE001 - a capture failure only costs speed
                    log.warning("SparseGPT: CUDA graph capture failed (%s); running the column loop eagerly", e)
                    graphs[key] = None
            graph = graphs[key]
        if graph is not None:
            W1t, mask_t, Err1t = graph(W1t, Hs, inv_d, scale_t, mask_t)
        else:
            Err1t = torch.empty_like(W1t)
            _obs_columns(W1t, Hs, inv_d, scale_t, mask_t, Err1t, n, m, Hinv1.diagonal() if reference else None)
        W[:, i1:i2] = W1t.t().masked_fill(mask_t.t(), 0.0)
        mask[:, i1:i2] = mask_t.t()
        if i2 < cols:
            W[:, i2:].sub_(Err1t.t().matmul(hinv_upper[i1:i2, i2:]))
    apply_mask_(W, mask)
    return PruneResult(mask=mask, weight=W)


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = field(default=128, metadata={"help": "columns per lazy block", "label": "SparseGPT block size"})
    percdamp: float = field(default=0.01, metadata={"help": "dampening, a fraction of the Hessian's mean diagonal",
                                                    "label": "SparseGPT dampening"})

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise LLMPruneError(f"sparsegpt_blocksize must be >= 1, got {self.blocksize}")
        if not (self.percdamp > 0.0):
            raise LLMPruneError(f"sparsegpt_percdamp must be > 0, got {self.percdamp}")


@register_scorer("sparsegpt")
class SparseGPT(Scorer):
    needs = ("hessian",)
    Options = SparseGPTOptions
    default_group = "per-layer"

    @classmethod
    def check_options(cls, options: SparseGPTOptions, pattern: Pattern) -> None:
        if pattern.kind == "nm" and options.blocksize % pattern.m:
            raise LLMPruneError(f"sparsegpt_blocksize {options.blocksize} must be a multiple of M={pattern.m}")

    def __init__(self, config=None):
        super().__init__(config)
        self._cached: tuple[LayerStats, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._graphs: dict = {}  # CUDA graphs of the column loop, per shape, kept for the whole run

    def inverse_hessian(self, stats: LayerStats):
        # Layers that read the same input (q/k/v, gate/up) share one LayerStats: factor its Hessian once.
        if self._cached is None or self._cached[0] is not stats:
            self._cached = (stats, sparsegpt_inverse_hessian(stats.hessian, self.options.percdamp))
        return self._cached[1]

    def end_block(self) -> None:
        self._cached = None  # the factor of the block's Hessians is not needed any more

    def prune(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern, group: str) -> PruneResult:
        if pattern.kind == "unstructured" and pattern.sparsity == 0:
            return PruneResult(torch.zeros(weight.shape, dtype=torch.bool, device=weight.device))  # a no-op
        hinv, dead = self.inverse_hessian(stats)
        return sparsegpt_prune(weight, hinv, dead, pattern, group, self.options.blocksize, self._graphs,
                               selection=self.selection)
