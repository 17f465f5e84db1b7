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

from ..stats import LayerStats, _hessian_update, add_to_stats, check_needs  # noqa: F401  (re-exported)


class StopBlockForward(Exception):
    """Raised by a hook to end a block's forward early; the block runner skips that batch's output."""


@contextlib.contextmanager
def observe(block: nn.Module, layers: dict[str, nn.Module], need: str | tuple[str, ...], stop_early: bool = False):
    """Within the context, every forward of `block` adds each layer's inputs to `stats[name]` (yielded): the
    registered statistics named by `need` (`llmprune.stats`: "sqnorm", "hessian" or a tuple of names), each
    accumulated by its collector.

    `stop_early`: after the first forward, end each forward at the last linear layer (StopBlockForward); the
    caller must catch it and must not need the block's outputs."""
    need = check_needs(need)
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
