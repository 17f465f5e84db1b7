"""Capture everything that enters each Transformer block, without running the blocks.

The blocks are swapped for recorders that store their positional and keyword arguments (masks, position
ids, rotary embeddings, cache positions: whatever the model passes, per block, since e.g. Gemma gives
sliding-window and global layers different masks) and pass the hidden states through unchanged. The last
recorder stops the forward, so the final norm and the LM head never run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LLMPruneError
from ..models.arch import Blocks
from .placement import move_block, return_block

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, sink: list, last: bool, as_tuple: bool):
        super().__init__()
        self.index, self.sink, self.last, self.as_tuple = index, sink, last, as_tuple

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest, key = args[0], tuple(args[1:]), None
        elif "hidden_states" in kwargs:
            hidden, rest, key = kwargs.pop("hidden_states"), (), "hidden_states"
        else:
            raise LLMPruneError("a block was called without hidden states; this architecture is not supported")
        self.sink.append((self.index, hidden, rest, kwargs, key))
        if self.last:
            raise _Stop
        return (hidden,) if self.as_tuple else hidden


@dataclass
class BlockCall:
    """How block i is called: hidden states go in position 0 (or keyword `hidden_key`), then args/kwargs."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    hidden_key: str | None = None

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_key:
            out = block(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _share_equal(new, old):
    """Reuse the tensors of the previous batch's call where they are equal (masks and rotary tables repeat)."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        if new.shape == old.shape and new.dtype == old.dtype and new.device == old.device and torch.equal(new, old):
            return old
        return new
    if isinstance(new, dict) and isinstance(old, dict) and new.keys() == old.keys():
        return {k: _share_equal(new[k], old[k]) for k in new}
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old):
        return type(new)(_share_equal(a, b) for a, b in zip(new, old))
    return new


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: Blocks, tokens: torch.Tensor, batch_size: int,
                         device: torch.device, act_device: torch.device):
    """Run the model's embedding part on each batch of `tokens` and record each block's call.

    Returns (hidden, calls): hidden[b] is batch b's input to block 0 (on `act_device`), calls[i][b] the
    BlockCall of block i for batch b. Only the modules outside the blocks are moved to `device`, then back."""
    n_blocks = len(blocks)
    original = blocks.modules
    hidden_batches: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in range(n_blocks)]
    for as_tuple in (False, True):
        sink: list = []
        recorders = nn.ModuleList(_Recorder(i, sink, i == n_blocks - 1, as_tuple) for i in range(n_blocks))
        setattr(blocks.parent, blocks.attr, recorders)
        home = None
        try:
            home = move_block(model, device)  # the blocks are swapped out: only embeddings and head move
            ok = True
            for b0 in range(0, tokens.shape[0], batch_size):
                sink.clear()
                try:
                    model(input_ids=tokens[b0 : b0 + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
                seen = [s[0] for s in sink]
                chained = seen == list(range(n_blocks)) and all(
                    sink[i + 1][1] is sink[i][1] for i in range(n_blocks - 1)
                )
                if not chained:
                    ok = False
                    break
                hidden_batches.append(sink[0][1].to(act_device))
                for i, hidden, rest, kwargs, key in sink:
                    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
                    if "use_cache" in kwargs:
                        kwargs["use_cache"] = False
                    call = BlockCall(tuple(rest), kwargs, key)
                    if calls[i]:
                        prev = calls[i][-1]
                        call = BlockCall(_share_equal(call.args, prev.args), _share_equal(call.kwargs, prev.kwargs), key)
                    calls[i].append(call)
        finally:
            return_block(model, home, copy=False)
            setattr(blocks.parent, blocks.attr, original)
        if ok:
            break
        hidden_batches.clear()
        calls = [[] for _ in range(n_blocks)]
    else:
        raise LLMPruneError(
            f"architecture {type(model).__name__} is not supported: the hidden states are changed between "
            "blocks, so blocks cannot be run one at a time"
        )
    for b, h in enumerate(hidden_batches):
        if not torch.isfinite(h).all():
            raise LLMPruneError(f"NaN or Inf in the embeddings of calibration batch {b}; check the model and --dtype")
    return hidden_batches, calls
