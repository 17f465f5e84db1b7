"""Plumbing of block scoring: hidden states at the block boundaries, the model with one block skipped, and the
model's own tail (final norm, LM head, soft-capping...) applied to a given last hidden state.

One sequential pass of the existing runner gives, per calibration batch, the hidden state entering every block
(and leaving the last one). For the "skip" criteria the model without block i is then

    h = input of block i  ->  blocks i+1 .. L-1  ->  tail  ->  logits

so the blocks before i never run again. The candidates advance together, block by block (`skip_one_states`):
block j is moved to the device once and run on the states of every candidate i < j, L(L-1)/2 block calls in
all, each candidate's state overwriting the cached input it started from (memory: the L cached inputs).

The tail is the model's own code after its blocks (final norm, OPT's project_out, the LM head, Gemma's logit
soft-capping; `llmprune.logits.split_model`), applied to chunks of tokens sized so that the chunk's float32
logits and the scorer's copies of them fit the logits budget (`llmprune.logits.chunk_tokens`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from ..calibration import BlockContext, run_sequential
from ..calibration.capture import BlockCall
from ..logits import chunk_tokens, logits_budget, next_token_targets, split_model, token_chunks, vocab_size
from ..models.arch import Blocks, find_blocks
from ..progress import progress
from .base import BlockScorer

log = logging.getLogger(__name__)

def token_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The calibration windows in the runner's batches."""
    return [tokens[b0 : b0 + batch_size] for b0 in range(0, tokens.shape[0], batch_size)]


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
                   activation_copies=3, desc=f"{scorer.name}: score", writeback=False)
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
                   activation_copies=n + 1, desc=desc, writeback=False)  # every block's inputs are kept
    return cache


@torch.no_grad()
def skip_one_states(blocks: Blocks, cache: BlockCache, device: torch.device, desc: str = "skip") -> list[list[torch.Tensor]]:
    """states[i][b]: the last hidden state of batch b when block i is skipped (blocks i+1.. run on block i's
    input). Consumes `cache.inputs`, whose tensors are replaced in place; block j runs once per candidate i < j."""
    states = cache.inputs
    n = len(blocks)
    for j in progress(range(1, n), desc=f"{desc}: skip one", unit="block", leave=False):
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


@contextlib.contextmanager
def model_tail(model: nn.Module, blocks: Blocks, device: torch.device,
               as_tuple: bool = False) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Yield `tail(hidden, input_ids) -> logits`: the model's forward after its last block, on `hidden`
    (batch, seqlen, hidden) as if the blocks had produced it. Only the modules outside the blocks move to
    `device`; the blocks are put back (and the model moved home) when the context exits."""
    with split_model(model, device, blocks, as_tuple) as split:
        yield split.logits


@torch.no_grad()
def skip_totals(model: nn.Module, tokens: torch.Tensor, scorer: BlockScorer, *, device: torch.device,
                batch_size: int, logits_budget_mb: float | None = None) -> list[torch.Tensor]:
    """Sum over chunks of `scorer.stats(logits without block i, next-token targets, dense logits)` for every
    block i; a chunk is as many tokens as `scorer.logit_copies` float32 logits of fit in the logits budget."""
    cache = cache_block_states(model, tokens, device=device, batch_size=batch_size, desc=f"{scorer.name}: cache")
    blocks = find_blocks(model)
    n = len(blocks)
    states = skip_one_states(blocks, cache, device, desc=scorer.name)
    budget = logits_budget(device, logits_budget_mb)  # on a GPU: from what the cached states leave free
    per_chunk = chunk_tokens(vocab_size(model), budget, scorer.logit_copies)
    log.info("%s: logits of %d tokens at a time (budget %.0f MiB)", scorer.name, per_chunk, budget / 2**20)
    totals: list[torch.Tensor | None] = [None] * n
    with model_tail(model, blocks, device, cache.returns_tuple) as tail:
        for b, ids in enumerate(progress(token_batches(tokens, batch_size), desc=f"{scorer.name}: logits",
                                     unit="batch", leave=False)):
            targets = next_token_targets(ids)
            for rows, cols in token_chunks(ids.shape[0], ids.shape[1], per_chunk):
                tok, tgt = ids[rows, cols].to(device), targets[rows, cols].to(device)
                dense = tail(cache.outputs[b][rows, cols], tok) if scorer.needs_dense else None
                for i in range(n):
                    s = scorer.stats(tail(states[i][b][rows, cols], tok), tgt, dense)
                    totals[i] = s if totals[i] is None else totals[i] + s
                del dense
    return [t.cpu() for t in totals]  # type: ignore[union-attr]
