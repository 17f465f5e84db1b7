"""Forward pre-hooks that accumulate float32 statistics of each linear layer's inputs.

Consecutive layers that read the very same input tensor object (q/k/v projections, gate/up) share one
LayerStats, so its statistics are computed once. Identity is checked with `is` on a live reference, never on
addresses, which the allocator reuses. Hooks are always removed when the `observe` context exits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..scorers.base import LayerStats

# tokens per chunk when upcasting inputs for the Hessian, to bound the float32 copy
_CHUNK = 8192


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
        for i in range(0, x2.shape[0], _CHUNK):
            c = x2[i : i + _CHUNK].float()
            stats.hessian.addmm_(c.t(), c)


@contextlib.contextmanager
def observe(block: nn.Module, layers: dict[str, nn.Module], need: str):
    """Within the context, every forward of `block` adds each layer's inputs to `stats[name]` (yielded)."""
    stats: dict[str, LayerStats] = {}
    last: list = [None, None]  # the last input tensor seen in this forward of the block, and its stats

    def make_hook(name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if x is last[0]:  # same tensor object as the previous layer's input (q/k/v, gate/up)
                if name not in stats:
                    stats[name] = last[1]
                if stats[name] is last[1]:
                    return
            st = stats.setdefault(name, LayerStats())
            add_to_stats(st, x.detach(), need)
            last[0], last[1] = x, st

        return hook

    def clear_seen(module, args):
        last[0] = last[1] = None

    handles = [block.register_forward_pre_hook(clear_seen),
               block.register_forward_hook(lambda module, args, output: clear_seen(module, args))]
    handles += [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
