"""The sequential column loop of one SparseGPT lazy block as a single Triton kernel (CUDA only).

Rows of the weight are independent in the OBS update (they share H^-1), so each program owns a tile of rows
and walks the block's columns in order with the tile in registers: for column i it takes the column's current
value w, the error e = w * [pruned] / [H^-1]_ii, writes e, and spreads it over the later columns,
W[:, j] -= e * U[i, j] (U: the block of the upper Cholesky factor with its diagonal zeroed). For 2:4-style
patterns (M = 4) the mask of each group of four columns is chosen first, from the already-updated weights, by
the OBS saliency w^2 / [H^-1]_jj^2 (ties: the lower column index counts as lower). One launch replaces the
several small kernels per column of the eager loop. `sparsegpt.py` falls back to its own loop where Triton or
a supported shape is missing; the GPU tests check that both give the same result.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ROWS_PER_PROGRAM = 16


def available(weight: torch.Tensor, count: int, nm: tuple[int, int] | None) -> bool:
    """Whether the kernel covers this call: CUDA, a power-of-two block of 16..256 columns, unstructured or N:4."""
    if triton is None or not weight.is_cuda:
        return False
    if count < 16 or count > 256 or count & (count - 1):
        return False
    return nm is None or (nm[1] == 4 and count % 4 == 0)


if triton is not None:

    @triton.jit
    def _obs_block_kernel(W, E, S, MK, H, INVD, rows, ldw, ld, col0,
                          COUNT: tl.constexpr, BR: tl.constexpr, NM: tl.constexpr, PRUNE: tl.constexpr):
        # W: (rows, ldw) float32, the block at columns col0..col0+COUNT, updated in place (pruned -> 0)
        # E, S, MK: (rows, ld=COUNT) errors out / scales in (unstructured) / mask out (int8, N:4)
        # H: (COUNT, COUNT) strictly upper part of the factor's block; INVD: (COUNT,) 1 / its diagonal
        pid = tl.program_id(0)
        r = pid * BR + tl.arange(0, BR)
        rmask = r < rows
        k = tl.arange(0, COUNT)
        tile = W + r[:, None] * ldw + col0 + k[None, :]
        T = tl.load(tile, mask=rmask[:, None], other=0.0)  # (BR, COUNT)
        if NM:
            P = tl.zeros((BR, COUNT), dtype=tl.int32)  # the chosen mask, kept in registers (no read-back)
            for i0 in range(0, COUNT, 4):
                w0 = tl.sum(tl.where(k[None, :] == i0, T, 0.0), axis=1)
                w1 = tl.sum(tl.where(k[None, :] == i0 + 1, T, 0.0), axis=1)
                w2 = tl.sum(tl.where(k[None, :] == i0 + 2, T, 0.0), axis=1)
                w3 = tl.sum(tl.where(k[None, :] == i0 + 3, T, 0.0), axis=1)
                d0 = tl.load(INVD + i0)
                d1 = tl.load(INVD + i0 + 1)
                d2 = tl.load(INVD + i0 + 2)
                d3 = tl.load(INVD + i0 + 3)
                s0 = w0 * w0 * d0 * d0
                s1 = w1 * w1 * d1 * d1
                s2 = w2 * w2 * d2 * d2
                s3 = w3 * w3 * d3 * d3
                # rank of each saliency among the four (ties: lower index first); the PRUNE lowest are pruned
                n0 = (s1 < s0).to(tl.int32) + (s2 < s0).to(tl.int32) + (s3 < s0).to(tl.int32)
                n1 = (s0 <= s1).to(tl.int32) + (s2 < s1).to(tl.int32) + (s3 < s1).to(tl.int32)
                n2 = (s0 <= s2).to(tl.int32) + (s1 <= s2).to(tl.int32) + (s3 < s2).to(tl.int32)
                n3 = (s0 <= s3).to(tl.int32) + (s1 <= s3).to(tl.int32) + (s2 <= s3).to(tl.int32)
                p0 = n0 < PRUNE
                p1 = n1 < PRUNE
                p2 = n2 < PRUNE
                p3 = n3 < PRUNE
                tl.store(MK + r * ld + i0, p0.to(tl.int8), mask=rmask)
                tl.store(MK + r * ld + i0 + 1, p1.to(tl.int8), mask=rmask)
                tl.store(MK + r * ld + i0 + 2, p2.to(tl.int8), mask=rmask)
                tl.store(MK + r * ld + i0 + 3, p3.to(tl.int8), mask=rmask)
                P = tl.where(k[None, :] == i0, p0.to(tl.int32)[:, None], P)
                P = tl.where(k[None, :] == i0 + 1, p1.to(tl.int32)[:, None], P)
                P = tl.where(k[None, :] == i0 + 2, p2.to(tl.int32)[:, None], P)
                P = tl.where(k[None, :] == i0 + 3, p3.to(tl.int32)[:, None], P)
                # column i0 (its value is w0), then i0+1..i0+3 read again after each update
                e = tl.where(p0, w0 * d0, 0.0)
                tl.store(E + r * ld + i0, e, mask=rmask)
                T -= e[:, None] * tl.load(H + i0 * COUNT + k)[None, :]
                w = tl.sum(tl.where(k[None, :] == i0 + 1, T, 0.0), axis=1)
                e = tl.where(p1, w * d1, 0.0)
                tl.store(E + r * ld + i0 + 1, e, mask=rmask)
                T -= e[:, None] * tl.load(H + (i0 + 1) * COUNT + k)[None, :]
                w = tl.sum(tl.where(k[None, :] == i0 + 2, T, 0.0), axis=1)
                e = tl.where(p2, w * d2, 0.0)
                tl.store(E + r * ld + i0 + 2, e, mask=rmask)
                T -= e[:, None] * tl.load(H + (i0 + 2) * COUNT + k)[None, :]
                w = tl.sum(tl.where(k[None, :] == i0 + 3, T, 0.0), axis=1)
                e = tl.where(p3, w * d3, 0.0)
                tl.store(E + r * ld + i0 + 3, e, mask=rmask)
                T -= e[:, None] * tl.load(H + (i0 + 3) * COUNT + k)[None, :]
            pruned = P != 0
        else:
            for i in range(COUNT):
                w = tl.sum(tl.where(k[None, :] == i, T, 0.0), axis=1)
                e = w * tl.load(S + r * ld + i, mask=rmask, other=0.0)
                tl.store(E + r * ld + i, e, mask=rmask)
                T -= e[:, None] * tl.load(H + i * COUNT + k)[None, :]
            pruned = tl.load(S + r[:, None] * ld + k[None, :], mask=rmask[:, None], other=0.0) != 0.0
        tl.store(tile, tl.where(pruned, 0.0, T), mask=rmask[:, None])


def obs_block_(W: torch.Tensor, col0: int, count: int, Hs: torch.Tensor, inv_d: torch.Tensor,
               scale: torch.Tensor | None, nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the lazy block at columns col0..col0+count of W (rows, cols) float32 in place: pruned weights become
    0, kept ones their OBS-updated values. `scale` (rows, count): [pruned] / d for unstructured (None for N:4).
    Returns the errors (rows, count) and, for N:4, the mask it chose (rows, count) bool."""
    rows = W.shape[0]
    err = torch.empty(rows, count, dtype=torch.float32, device=W.device)
    mk = torch.empty(rows, count, dtype=torch.int8, device=W.device) if nm else err  # unused for unstructured
    s = scale if scale is not None else err  # unused for N:4
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _obs_block_kernel[grid](W, err, s.contiguous(), mk, Hs.contiguous(), inv_d.contiguous(), rows, W.stride(0),
                            count, col0, COUNT=count, BR=ROWS_PER_PROGRAM, NM=nm is not None,
                            PRUNE=(nm[1] - nm[0]) if nm else 0, num_warps=4)
    return err, (mk != 0) if nm else None
