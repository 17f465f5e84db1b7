"""Architecture discovery, generically rather than by `model.model.layers` alone: the list of Transformer blocks
(`find_blocks`), the prunable linear layers of a block (`linear_layers`: nn.Linear and GPT-2's Conv1D), and each
layer's weight as an (out_features, in_features) view (`weight_oi`).

This is also where the next issue adds the coupled groups that structured pruning needs: gate/up rows with down
columns; q/k/v rows per key-value head with o columns; fused qkv and gate_up; GPT-2's Conv1D (rows and columns
swapped). Removing one unit there means removing the matching rows of one layer and columns of another together.

A low room: it imports torch and transformers only, never the loading or saving of models (`load`, `save`), so
calibration, statistics, scorers and targets may use it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LLMPruneError


def _num_layers(model: nn.Module) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class Blocks:
    """The decoder blocks of a model: the ModuleList, its dotted path, and its parent for replacement."""

    path: str
    modules: nn.ModuleList
    parent: nn.Module
    attr: str

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, i: int) -> nn.Module:
        return self.modules[i]


def find_blocks(model: nn.Module) -> Blocks:
    """The ModuleList of identical Transformer blocks (as many as the config's layer count, most parameters)."""
    n = _num_layers(model)
    arch = type(model).__name__
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if len({type(c) for c in mod}) == 1:
                nparams = sum(p.numel() for p in mod.parameters())
                candidates.append((nparams, name, mod))
    if not candidates:
        raise LLMPruneError(
            f"architecture {arch} is not supported: no list of {n or 'identical'} Transformer blocks was found"
        )
    _, name, mod = max(candidates, key=lambda c: c[0])
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return Blocks(path=name, modules=mod, parent=parent, attr=attr)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover
        return None


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Prunable layers inside a block: nn.Linear and GPT-2's Conv1D, by dotted name, in forward order."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d else ())
    return {name: m for name, m in block.named_modules() if isinstance(m, kinds)}


def weight_oi(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view (Conv1D stores (in, out))."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return layer.weight.data.t()
    return layer.weight.data


def in_features(layer: nn.Module) -> int:
    return weight_oi(layer).shape[1]

