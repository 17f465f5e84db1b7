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
from tqdm.auto import tqdm

from ..errors import LLMPruneError
from ..models import Blocks, find_blocks
from .capture import BlockCall, capture_block_inputs
from .placement import move_block, return_block

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[torch.Tensor] | None:
        """Run the block on every batch (hooks fire); return the outputs if asked, on the activation device."""
        outs = [] if keep_outputs else None
        for h, call in zip(self.inputs, self.calls):
            y = call(self.block, h.to(self.device, non_blocking=True))
            if outs is not None:
                outs.append(y.to(h.device, non_blocking=True))
        return outs


def choose_activation_device(tokens: torch.Tensor, hidden_size: int, dtype: torch.dtype, device: torch.device,
                             policy: str = "auto") -> torch.device:
    """Keep the calibration activations on the accelerator when inputs + outputs fit in half its free memory."""
    if device.type == "cpu" or policy == "cpu":
        return torch.device("cpu")
    if policy == "device":
        return device
    need = 2 * tokens.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, process: Callable[[BlockContext], None], *,
                   device: torch.device, batch_size: int, offload_activations: str = "auto",
                   propagate_last: bool = False, desc: str = "prune") -> list[dict[str, float]]:
    """Run `process` on every block in order; block i+1's inputs are block i's outputs after `process`.

    Returns the per-block timings (seconds)."""
    blocks: Blocks = find_blocks(model)
    n = len(blocks)
    dtype = next(model.parameters()).dtype
    hidden_size = model.config.get_text_config().hidden_size
    act_device = choose_activation_device(tokens, hidden_size, dtype, device, offload_activations)
    t0 = time.perf_counter()
    hidden, calls = capture_block_inputs(model, blocks, tokens, batch_size, device, act_device)
    _sync(device)
    log.info("captured block inputs: %d batches in %.2f s (activations on %s)", len(hidden),
             time.perf_counter() - t0, act_device)
    timings = []
    bar = tqdm(range(n), desc=desc, unit="block", leave=False)
    for i in bar:
        block = blocks[i]
        t = time.perf_counter()
        home = move_block(block, device)
        ctx = BlockContext(i, n, block, device, hidden, calls[i])
        bar.set_description(f"{desc}: block {i + 1}/{n}")
        try:
            process(ctx)
            if i < n - 1 or propagate_last:
                tp = time.perf_counter()
                hidden = ctx.forward(keep_outputs=True)
                _sync(device)  # device-to-host copies are asynchronous: finish them before reading
                for b, h in enumerate(hidden):
                    if not torch.isfinite(h).all():
                        raise LLMPruneError(f"NaN or Inf in the activations after block {i} (batch {b}); "
                                            "try --dtype float32 or bfloat16")
                ctx.timings["propagate"] = time.perf_counter() - tp
        finally:
            return_block(block, home)  # also on errors: the block goes back to its host storage
        ctx.timings["total"] = time.perf_counter() - t
        timings.append(ctx.timings)
        log.info("block %d/%d: %.2f s (%s)", i + 1, n, ctx.timings["total"],
                 ", ".join(f"{k} {v:.2f}" for k, v in ctx.timings.items() if k != "total"))
    return timings
