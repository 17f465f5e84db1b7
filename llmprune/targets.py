"""What a decision removes and how it is applied (the engine's fourth part): a registry of targets.

A target lists the units of a block, the things one decision is about, asks the scorer for a decision on each,
and applies it. `mask`, the only target today: a unit is one linear layer, decided weight by weight (a
boolean mask, unstructured or N:M) and applied as exact zeros; no shape changes.

The interface admits larger units and shape changes, which structured pruning adds: a unit may span coupled
layers (an MLP channel: a row of gate and up with the matching column of down; a key-value head: its rows of
q, k, v and columns of o; a whole block), each named with the dimension it loses indices along (`dims`: 0 the
output rows, 1 the input columns). A target with `changes_shape = True` makes the layers smaller in `apply`
and rewrites the model's config in `finalize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LLMPruneError
from .masks import Pattern, apply_mask_
from .models.arch import in_features, linear_layers, weight_oi
from .registry import Registry
from .stats import LayerStats


@dataclass(frozen=True)
class Unit:
    """A part of a block that one decision is about.

    `kind`: what the decision selects: "weight" (single weights, a mask of the layer), later "channel", "head",
    "block". `layers`: names (in the block) of the linear layers it touches; `dims`: per layer, the dimension a
    structured decision removes indices along (0: output rows, 1: input columns; None for "weight").
    `size`: how many weights it holds."""

    name: str
    kind: str
    layers: tuple[str, ...]
    dims: tuple[int | None, ...]
    size: int


@dataclass
class Decision:
    """A scorer's decision on one unit: `remove` (bool; for "weight" units (out, in), True = zero it) and, when
    the scorer also updates the weights it keeps (SparseGPT), the new weights of the unit's layers."""

    remove: torch.Tensor
    weights: dict[str, torch.Tensor] | None = None


class Target:
    """Base class. `unit_kind`: the kind of its units (a scorer lists the kinds it can decide on);
    `changes_shape`: whether applying decisions makes layers smaller (then `finalize` rewrites the config)."""

    name: str = ""
    unit_kind: str = "weight"
    changes_shape: bool = False

    def __init__(self, config=None):
        self.config = config

    def units(self, block: nn.Module, config) -> list[Unit]:
        """The units of one block (`config`: the model's text config, for heads and groups)."""
        raise NotImplementedError

    def check(self, block: nn.Module, units: Sequence[Unit], plan: Mapping[str, Pattern], where: str) -> None:
        """Fail before anything changes when a unit cannot take its planned pattern."""

    def decide(self, scorer, block: nn.Module, unit: Unit, stats: Mapping[str, LayerStats], pattern: Pattern,
               group: str) -> Decision:
        raise NotImplementedError

    def apply(self, block: nn.Module, unit: Unit, decision: Decision) -> None:
        raise NotImplementedError

    def finalize(self, model: nn.Module) -> None:
        """After the last block: a shape-changing target rewrites the model's config here."""


TARGETS: Registry[type[Target]] = Registry("target")


def register_target(name: str):
    """Class decorator: `@register_target("mask")` beside the class."""
    return TARGETS.register_class(name)


def _layer(block: nn.Module, name: str) -> nn.Module:
    return block.get_submodule(name)


@register_target("mask")
class MaskTarget(Target):
    """Element masks written as exact zeros: one unit per linear layer of the block, its (out, in) weights
    pruned to the unit's pattern (unstructured within the comparison group, or N:M along the input)."""

    unit_kind = "weight"
    changes_shape = False

    def units(self, block, config):
        return [Unit(name, "weight", (name,), (None,), weight_oi(layer).numel())
                for name, layer in linear_layers(block).items()]

    def check(self, block, units, plan, where):
        for u in units:
            pattern = plan[u.name]
            if pattern.kind == "nm":
                width = in_features(_layer(block, u.name))
                if width % pattern.m:
                    raise LLMPruneError(f"pattern {pattern.name}: input width {width} of {where}.{u.name} "
                                        f"is not divisible by M={pattern.m}")

    def decide(self, scorer, block, unit, stats, pattern, group):
        name = unit.layers[0]
        w = weight_oi(_layer(block, name))  # (out, in), a view into the parameter
        result = scorer.prune(w, stats.get(name), pattern, group)
        return Decision(result.mask, None if result.weight is None else {name: result.weight})

    def apply(self, block, unit, decision):
        name = unit.layers[0]
        w = weight_oi(_layer(block, name))
        if decision.weights is not None:
            w.copy_(decision.weights[name].to(w.dtype))
        apply_mask_(w, decision.remove)


__all__ = ["Unit", "Decision", "Target", "TARGETS", "register_target", "MaskTarget"]
