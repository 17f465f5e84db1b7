"""Moving a block (or the model outside its blocks) to the accelerator and back into the same host memory."""

from __future__ import annotations

import torch
from torch import nn


def move_block(block: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Move a block's parameters and buffers to `device`; return their original host tensors (None if already
    there), so `return_block` can copy results back into the same host memory instead of allocating new pages."""
    tensors = dict(block.named_parameters())
    tensors.update(block.named_buffers())
    if not tensors or next(iter(tensors.values())).device == device:
        return None
    home = {name: t.data for name, t in tensors.items()}
    block.to(device)
    return home


def return_block(block: nn.Module, home: dict[str, torch.Tensor] | None, copy: bool = True) -> None:
    """Copy the block's (possibly pruned) tensors back into their original host storage and point them there
    (`copy=False`: the tensors were only read, so just point them back)."""
    if home is None:
        return
    tensors = dict(block.named_parameters())
    tensors.update(block.named_buffers())
    for name, t in tensors.items():
        host = home[name]
        if copy:
            host.copy_(t.data)
        t.data = host
