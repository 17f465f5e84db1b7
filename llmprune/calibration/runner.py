"""The sequential block runner: one block at a time on the accelerator, calibrated on the outputs of the
already-processed blocks before it.

    capture inputs of every block  ->  for i in blocks:  move block i to the device
                                                          process(ctx)   # observe / decide / apply
                                                          propagate: outputs of block i = inputs of block i+1
                                                          move block i back
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import LLMPruneError, step_detail
from ..models.arch import Blocks, find_blocks
from ..progress import progress
from .capture import BlockCall, capture_block_inputs
from .compiled import run_plain
from .observe import StopBlockForward
from .placement import BlockShuttle, choose_activation_device

log = logging.getLogger(__name__)


def sync_compute(device: torch.device) -> None:
    """Wait for the compute stream only (block transfers run on their own stream meanwhile)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class BlockContext:
    """What a block processor sees: the block (on `device`) and its calibration inputs, batch by batch."""

    index: int
    num_blocks: int
    block: nn.Module
    device: torch.device
    inputs: list[torch.Tensor]  # per batch: (batch, seqlen, hidden), on the activation device
    calls: list[BlockCall]  # per batch: the other arguments of the block
    timings: dict[str, float] = field(default_factory=dict)
    compiled: bool = False  # propagate through the compiled forward (llmprune.calibration.compiled)

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False, in_place: bool = False) -> list[torch.Tensor] | None:
        """Run the block on every batch (hooks fire); return the outputs if asked, on the activation device.

        `in_place`: each batch's output replaces its input in `self.inputs` as soon as it is computed, so the
        inputs and outputs of all batches are never held at once. A hook may end a batch's forward early by
        raising StopBlockForward (the statistics pass needs nothing after the block's last linear layer)."""
        outs = self.inputs if in_place else ([] if keep_outputs else None)
        for b in range(len(self.inputs)):
            h = self.inputs[b]
            try:
                if self.compiled:
                    y = run_plain(self.calls[b], self.block, h.to(self.device, non_blocking=True))
                else:
                    y = self.calls[b](self.block, h.to(self.device, non_blocking=True))
            except StopBlockForward:
                continue
            if outs is not None:
                y = y.to(h.device, non_blocking=True)
                if in_place:
                    outs[b] = y
                else:
                    outs.append(y)
            del h
        return outs


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, process: Callable[[BlockContext], None], *,
                   device: torch.device, batch_size: int, offload_activations: str = "auto",
                   propagate_last: bool = False, desc: str = "prune", writeback: bool = True,
                   release_inputs: bool = False, prefetch: bool = True,
                   transfers: dict[str, float] | None = None, activation_copies: int = 2,
                   compiled: bool = False) -> list[dict[str, float]]:
    """Run `process` on every block in order; block i+1's inputs are block i's outputs after `process`.

    `writeback`: `process` changes the blocks, copy them back to host memory. `release_inputs`: `process` keeps
    no reference to `ctx.inputs`, so block i's outputs may replace its inputs batch by batch (less memory).
    `prefetch`: on a GPU, move block i+1 in and block i-1 out while block i runs. `activation_copies`: how many
    copies of all windows' activations `process` keeps alive at once (inputs and outputs: 2), for the `auto`
    placement of `offload_activations` (see `choose_activation_device`). Returns the per-block
    timings (seconds); `transfers`, if given, receives the seconds spent moving blocks (overlapped with the
    computation on a GPU). `compiled`: propagate through the compiled block forward."""
    blocks: Blocks = find_blocks(model)
    n = len(blocks)
    dtype = next(model.parameters()).dtype
    hidden_size = model.config.get_text_config().hidden_size
    act_device = choose_activation_device(tokens, hidden_size, dtype, device, offload_activations, activation_copies)
    t0 = time.perf_counter()
    hidden, calls = capture_block_inputs(model, blocks, tokens, batch_size, device, act_device)
    sync_compute(device)
    log.info("captured block inputs: %d batches in %.2f s (activations on %s)", len(hidden),
             time.perf_counter() - t0, act_device)
    timings = []
    bar = progress(range(n), desc=desc, unit="block", leave=False)
    shuttle = BlockShuttle(blocks.modules, device, writeback=writeback, prefetch=prefetch)
    try:
        for i in bar:
            t = time.perf_counter()
            block = shuttle.get(i)
            ctx = BlockContext(i, n, block, device, hidden, calls[i], compiled=compiled)
            bar.set_description(f"{desc}: block {i + 1}/{n}")
            step_detail(f"block {i + 1}/{n}")  # named in the one line of an unexpected error
            try:
                process(ctx)
                if i < n - 1 or propagate_last:
                    tp = time.perf_counter()
                    hidden = ctx.forward(keep_outputs=True, in_place=release_inputs)
                    _check_finite(hidden, i, device)
                    ctx.timings["propagate"] = time.perf_counter() - tp
            finally:
                shuttle.put(i)  # also on errors: the block goes back to its host storage
            ctx.timings["total"] = time.perf_counter() - t
            timings.append(ctx.timings)
            log.info("block %d/%d: %.2f s (%s)", i + 1, n, ctx.timings["total"],
                     ", ".join(f"{k} {v:.2f}" for k, v in ctx.timings.items() if k != "total"))
        step_detail(None)  # every block done
    finally:
        shuttle.close()  # every block's values are back in host memory
        if transfers is not None:
            transfers.update(shuttle.transfer_seconds)
    return timings


def _check_finite(hidden: list[torch.Tensor], index: int, device: torch.device) -> None:
    """One device-side reduction over all batches, one synchronization (device-to-host copies are
    asynchronous: they are finished before reading)."""
    sync_compute(device)
    bad = torch.stack([torch.isfinite(h).all() for h in hidden]).logical_not()
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise LLMPruneError(f"NaN or Inf in the activations after block {index} (batch {b}); "
                            "try --dtype float32 or bfloat16")
