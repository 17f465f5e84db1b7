"""Plumbing of block scoring: hidden states at the block boundaries, the model with one block skipped, and the
model's own tail (final norm, LM head, soft-capping...) applied to a given last hidden state.

One sequential pass of the existing runner gives, per calibration batch, the hidden state entering every block
(and leaving the last one). For the "skip" criteria the model without block i is then

    h = input of block i  ->  blocks i+1 .. L-1  ->  tail  ->  logits

so the blocks before i never run again. The candidates advance together, block by block (`skip_one_states`):
block j is moved to the device once and run on the states of every candidate i < j, L(L-1)/2 block calls in
all, each candidate's state overwriting the cached input it started from (memory: the L cached inputs).

The tail: the block list is temporarily replaced by pass-through modules, the first of which substitutes the
given hidden state for whatever the embeddings produced, and the model's ordinary forward runs on the window's
token ids. Whatever the model does after its blocks (final norm, OPT's project_out, Gemma's logit soft-capping,
the LM head) is thus the model's own code; masks, positions and embedding scaling are computed as usual and
then ignored.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import BlockContext, run_sequential
from ..calibration.capture import BlockCall
from ..errors import LLMPruneError
from ..models import Blocks, find_blocks
from .base import BlockScorer

log = logging.getLogger(__name__)

# tokens per tail call: bounds the (tokens, vocab) float32 logits held at once
TAIL_TOKENS = 4096


def token_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The calibration windows in the runner's batches."""
    return [tokens[b0 : b0 + batch_size] for b0 in range(0, tokens.shape[0], batch_size)]


def _offload_policy(model: nn.Module, tokens: torch.Tensor, device: torch.device, copies: int) -> str:
    """Keep `copies` cached activations on the accelerator when they fit in half its free memory."""
    if device.type != "cuda":
        return "cpu"
    dtype = next(model.parameters()).dtype
    hidden = model.config.get_text_config().hidden_size
    need = copies * tokens.numel() * hidden * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need < 0.5 * free else "cpu"


@torch.no_grad()
def boundary_totals(model: nn.Module, tokens: torch.Tensor, scorer: BlockScorer, *, device: torch.device,
                    batch_size: int) -> list[torch.Tensor]:
    """Sum of `scorer.stats(x_in, x_out)` over batches for every block; one sequential pass, two states live."""
    n = len(find_blocks(model))
    totals: list[torch.Tensor | None] = [None] * n
    prev: dict[str, list[torch.Tensor]] = {}

    def add(i: int, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for x_in, x_out in zip(ins, outs):
            s = scorer.stats(x_in, x_out).cpu()
            totals[i] = s if totals[i] is None else totals[i] + s

    def process(ctx: BlockContext) -> None:
        if ctx.index > 0:
            add(ctx.index - 1, prev["h"], ctx.inputs)  # block i-1's outputs are block i's inputs
        prev["h"] = ctx.inputs
        if ctx.index == ctx.num_blocks - 1:
            add(ctx.index, ctx.inputs, ctx.forward(keep_outputs=True))

    run_sequential(model, tokens, process, device=device, batch_size=batch_size,
                   offload_activations=_offload_policy(model, tokens, device, 3), desc=f"{scorer.name}: score",
                   writeback=False)
    return totals  # type: ignore[return-value]


class BlockCache:
    """What one sequential pass leaves: inputs[i][b] enters block i, outputs[b] leaves the last block."""

    def __init__(self) -> None:
        self.inputs: list[list[torch.Tensor]] = []  # per block, per batch: (batch, seqlen, hidden)
        self.calls: list[list[BlockCall]] = []  # per block, per batch
        self.outputs: list[torch.Tensor] = []  # per batch
        self.returns_tuple = False  # whether the blocks return (hidden, ...) rather than a tensor


@torch.no_grad()
def cache_block_states(model: nn.Module, tokens: torch.Tensor, *, device: torch.device, batch_size: int,
                       desc: str = "cache") -> BlockCache:
    """Run every block once, in order, keeping the state entering each block and the last block's output."""
    cache = BlockCache()

    def process(ctx: BlockContext) -> None:
        cache.inputs.append(ctx.inputs)
        cache.calls.append(ctx.calls)
        if ctx.index == ctx.num_blocks - 1:
            def seen(module, args, output):
                cache.returns_tuple = isinstance(output, (tuple, list))

            handle = ctx.block.register_forward_hook(seen)
            try:
                cache.outputs = ctx.forward(keep_outputs=True)
            finally:
                handle.remove()

    n = len(find_blocks(model))
    run_sequential(model, tokens, process, device=device, batch_size=batch_size,
                   offload_activations=_offload_policy(model, tokens, device, n + 1), desc=desc,
                   writeback=False)
    return cache


@torch.no_grad()
def skip_one_states(blocks: Blocks, cache: BlockCache, device: torch.device, desc: str = "skip") -> list[list[torch.Tensor]]:
    """states[i][b]: the last hidden state of batch b when block i is skipped (blocks i+1.. run on block i's
    input). Consumes `cache.inputs`, whose tensors are replaced in place; block j runs once per candidate i < j."""
    states = cache.inputs
    n = len(blocks)
    for j in tqdm(range(1, n), desc=f"{desc}: skip one", unit="block", leave=False):
        block = blocks[j]
        home = next(block.parameters()).device
        block.to(device)
        try:
            for i in range(j):
                for b, call in enumerate(cache.calls[j]):
                    h = states[i][b]
                    states[i][b] = call(block, h.to(device, non_blocking=True)).to(h.device, non_blocking=True)
        finally:
            block.to(home)
    return states


class _Substitute(nn.Module):
    """Stands in for block i: the first one replaces the hidden state by `slot["hidden"]`, all pass it on."""

    def __init__(self, slot: dict, first: bool, as_tuple: bool):
        super().__init__()
        self.slot, self.first, self.as_tuple = slot, first, as_tuple

    def forward(self, *args, **kwargs):
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            raise LLMPruneError("a block was called without hidden states; this architecture is not supported")
        if self.first:
            hidden = self.slot["hidden"]
            self.slot["used"] += 1
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def model_tail(model: nn.Module, blocks: Blocks, device: torch.device,
               as_tuple: bool = False) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Yield `tail(hidden, input_ids) -> logits`: the model's forward after its last block, on `hidden`
    (batch, seqlen, hidden) as if the blocks had produced it. Only the modules outside the blocks move to
    `device`; the blocks are put back (and the model moved home) when the context exits."""
    original = blocks.modules
    slot: dict = {"hidden": None, "used": 0}
    stand_ins = nn.ModuleList(_Substitute(slot, i == 0, as_tuple) for i in range(len(original)))
    home = next(model.parameters()).device
    setattr(blocks.parent, blocks.attr, stand_ins)
    try:
        if home != device:
            model.to(device)

        def tail(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
            slot["hidden"], slot["used"] = hidden.to(device), 0
            out = model(input_ids=input_ids.to(device), use_cache=False)
            slot["hidden"] = None
            if slot["used"] != 1:
                raise LLMPruneError(
                    f"architecture {type(model).__name__} is not supported for block scoring: its blocks are not "
                    "called once each in order"
                )
            return out.logits if hasattr(out, "logits") else out[0]

        yield tail
    finally:
        setattr(blocks.parent, blocks.attr, original)
        if home != device:
            model.to(home)


@torch.no_grad()
def skip_totals(model: nn.Module, tokens: torch.Tensor, scorer: BlockScorer, *, device: torch.device,
                batch_size: int) -> list[torch.Tensor]:
    """Sum over batches of `scorer.stats(logits without block i, tokens, dense logits)` for every block i."""
    cache = cache_block_states(model, tokens, device=device, batch_size=batch_size, desc=f"{scorer.name}: cache")
    blocks = find_blocks(model)
    n = len(blocks)
    states = skip_one_states(blocks, cache, device, desc=scorer.name)
    totals: list[torch.Tensor | None] = [None] * n
    with model_tail(model, blocks, device, cache.returns_tuple) as tail:
        for b, ids in enumerate(tqdm(token_batches(tokens, batch_size), desc=f"{scorer.name}: logits",
                                     unit="batch", leave=False)):
            step = max(1, TAIL_TOKENS // ids.shape[1])
            for c0 in range(0, ids.shape[0], step):
                c = slice(c0, c0 + step)
                tok = ids[c].to(device)
                dense = tail(cache.outputs[b][c], tok) if scorer.needs_dense else None
                for i in range(n):
                    s = scorer.stats(tail(states[i][b][c], tok), tok, dense).cpu()
                    totals[i] = s if totals[i] is None else totals[i] + s
    return totals  # type: ignore[return-value]
