"""Forward pre-hooks that accumulate float32 statistics of each linear layer's inputs.

Consecutive layers that read the very same input tensor object (q/k/v projections, gate/up) share one
LayerStats, so its statistics are computed once. Identity is checked with `is` on a live reference, never on
addresses, which the allocator reuses. Hooks are always removed when the `observe` context exits.

Only the inputs of the linear layers are needed, so once the block's last linear layer has seen its input the
rest of the forward is skipped (StopBlockForward), when the first forward showed that every layer runs exactly
once per forward (not for mixtures of experts, whose layers run a data-dependent number of times).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..scorers.base import LayerStats

# tokens per chunk when upcasting inputs for the Hessian, to bound the float32 copy
_CHUNK = 8192
_MM_OUT_DTYPE: list[bool] = []  # whether torch.mm(..., out_dtype=float32) works on this CUDA build (cached)


class StopBlockForward(Exception):
    """Raised by a hook to end a block's forward early; the block runner skips that batch's output."""


def _hessian_update(h: torch.Tensor, x2: torch.Tensor) -> None:
    """h += x2^T x2 in float32, exactly as with float32 inputs.

    On CUDA with bf16/fp16 inputs the products of the 8/11-bit mantissas are exact and the matrix units
    accumulate in float32, so a half-precision matmul with float32 output equals the float32 matmul up to
    summation order, at the matrix units' rate instead of the float32 rate (~15x slower). Where torch lacks
    that (`torch.mm(..., out_dtype=)`), the inputs are upcast; no global TF32 flag is touched."""
    half = x2.dtype in (torch.bfloat16, torch.float16) and x2.is_cuda
    if half and _MM_OUT_DTYPE != [False]:
        step, start = 4 * _CHUNK, 0
        if not _MM_OUT_DTYPE:  # first use: find out on one chunk, before anything is added to h
            c = x2[:step]
            try:
                first = torch.mm(c.t(), c, out_dtype=torch.float32)
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError):
                _MM_OUT_DTYPE[:] = [False]
            else:
                _MM_OUT_DTYPE[:] = [True]
                h.add_(first)
                start = step
        if _MM_OUT_DTYPE == [True]:
            for i in range(start, x2.shape[0], step):
                c = x2[i : i + step]
                h.add_(torch.mm(c.t(), c, out_dtype=torch.float32))
            return
    for i in range(0, x2.shape[0], _CHUNK):  # float32 matmuls, under the user's own TF32 setting
        c = x2[i : i + _CHUNK].float()
        h.addmm_(c.t(), c)


def add_to_stats(stats: LayerStats, x: torch.Tensor, need: str) -> None:
    """Accumulate the inputs x (..., in) of a layer: sum of squares per input feature, or X^T X."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    stats.ntokens += x2.shape[0]
    stats.nsamples += x.shape[0] if x.dim() > 2 else 1
    if need == "sqnorm":
        sq = torch.linalg.vector_norm(x2, ord=2, dim=0, dtype=torch.float32).square_()  # (in,)
        stats.sqnorm = sq if stats.sqnorm is None else stats.sqnorm.add_(sq)
    elif need == "hessian":
        if stats.hessian is None:
            stats.hessian = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
        _hessian_update(stats.hessian, x2)


@contextlib.contextmanager
def observe(block: nn.Module, layers: dict[str, nn.Module], need: str, stop_early: bool = False):
    """Within the context, every forward of `block` adds each layer's inputs to `stats[name]` (yielded).

    `stop_early`: after the first forward, end each forward at the last linear layer (StopBlockForward); the
    caller must catch it and must not need the block's outputs."""
    stats: dict[str, LayerStats] = {}
    last: list = [None, None]  # the last input tensor seen in this forward of the block, and its stats
    order: list[str] = []  # layers in the order they ran during the first forward
    stop_at: list[str] = []  # the last layer, once known

    def make_hook(name: str):
        def hook(module, args):
            if not stop_at:
                order.append(name)
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if x is last[0]:  # same tensor object as the previous layer's input (q/k/v, gate/up)
                if name not in stats:
                    stats[name] = last[1]
                if stats[name] is last[1]:
                    x = None
            if x is not None:
                st = stats.setdefault(name, LayerStats())
                add_to_stats(st, x.detach(), need)
                last[0], last[1] = x, st
            if stop_at and name == stop_at[0]:
                raise StopBlockForward

        return hook

    def clear_seen(module, args):
        last[0] = last[1] = None

    def after_forward(module, args, output):
        clear_seen(module, args)
        if stop_early and not stop_at and order:
            if sorted(order) == sorted(layers):  # every layer ran exactly once
                stop_at.append(order[-1])
            order.clear()

    handles = [block.register_forward_pre_hook(clear_seen), block.register_forward_hook(after_forward)]
    handles += [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
