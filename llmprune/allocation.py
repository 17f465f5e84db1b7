"""How much to prune in each layer and block (the engine's second part): a registry of allocations.

An allocation turns the pattern the user asked for (e.g. 50 % unstructured, 2:4) into one pattern per unit (per
linear layer for the `mask` target), before any weight changes. `uniform`, the papers' default, gives every
unit the target itself. An allocation that must see the model first (non-uniform or global allocation: outlier
ratios per layer, one threshold over the whole model) names the statistics it needs in `prepass`: the engine then
runs one dense pass over all blocks, collecting them, and hands each block's weights and statistics to
`summarize`, which keeps what `plan` needs (small: a number per layer, not a Hessian per layer of the model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LLMPruneError
from .masks import Pattern
from .registry import Registry
from .stats import LayerStats, check_needs


@dataclass(frozen=True)
class UnitRef:
    """A unit as an allocation sees it: block index, its name in the block, and how many weights it holds."""

    block: int
    name: str
    size: int


Plan = dict[tuple[int, str], Pattern]  # (block index, unit name) -> the pattern that unit is pruned to


class Allocation:
    """Base class. `prepass`: registered statistics (llmprune.stats) a dense pre-pass collects for `summarize`;
    () = no pre-pass, `plan` gets no summary."""

    name: str = ""
    prepass: tuple[str, ...] = ()

    def __init__(self, config=None):
        self.config = config

    def summarize(self, block: int, weights: Mapping[str, torch.Tensor],
                  stats: Mapping[str, LayerStats]) -> dict[str, Any]:
        """Per unit of one block (weights (out, in) and input statistics of the dense model), what `plan`
        needs. Called once per block during the pre-pass."""
        return {}

    def plan(self, target: Pattern, units: Sequence[UnitRef], summary: Mapping[tuple[int, str], Any] | None) -> Plan:
        """The pattern of every unit; `summary`: what `summarize` returned, by (block, unit), or None without a
        pre-pass."""
        raise NotImplementedError


ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation")


def register_allocation(name: str):
    """Class decorator: `@register_allocation("uniform")` beside the class."""

    def deco(cls: type[Allocation]) -> type[Allocation]:
        cls.prepass = check_needs(cls.prepass, f"allocation {name!r}")
        return ALLOCATIONS.register_class(name)(cls)

    return deco


def check_plan(plan: Mapping, units: Sequence[UnitRef], allocation: str) -> None:
    """Every unit has a pattern, and nothing else is planned."""
    want = {(u.block, u.name) for u in units}
    missing, extra = want - set(plan), set(plan) - want
    if missing or extra:
        raise LLMPruneError(f"allocation {allocation}: the plan misses {sorted(missing)[:3]} and names unknown "
                            f"units {sorted(extra)[:3]}")
    bad = [k for k, p in plan.items() if not isinstance(p, Pattern)]
    if bad:
        raise LLMPruneError(f"allocation {allocation}: the plan of {bad[0]} is not a Pattern")


@register_allocation("uniform")
class Uniform(Allocation):
    """The target pattern for every layer of every block (the papers' default)."""

    def plan(self, target, units, summary):
        return {(u.block, u.name): target for u in units}


__all__ = ["Allocation", "ALLOCATIONS", "register_allocation", "UnitRef", "Plan", "check_plan"]
