"""The scorer interface and its registry.

A scorer turns a weight (out_features, in_features) and the statistics of that layer's calibration inputs
into a prune mask; scorers that also update the surviving weights (SparseGPT) return the new weight. It names
the statistics it reads (`needs`, registered in `llmprune.stats`) and carries its options as a frozen
dataclass (`Options`), from which the CLI flags, config keys and the card's command are generated
(`llmprune.options`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import Pattern, select_mask
from ..options import NoOptions, check_options_class
from ..registry import Registry
from ..stats import LayerStats, check_needs, pass_for


@dataclass
class PruneResult:
    mask: torch.Tensor  # (out, in) bool, True = pruned
    weight: torch.Tensor | None = None  # (out, in) updated weight, or None if only masked


class Scorer:
    """Base class. `needs`: the registered statistics it reads, e.g. ("sqnorm",), () for none. `Options`: its
    frozen options dataclass; the instance for a run is `self.options`. `unit_kinds`: what it can decide on
    (`llmprune.targets`): "weight" (single weights, through masks)."""

    name: str = ""
    needs: tuple[str, ...] = ()
    Options: type = NoOptions
    default_group: str = "per-row"
    unit_kinds: tuple[str, ...] = ("weight",)

    def __init__(self, config=None):
        self.config = config
        opts = getattr(config, "options", None)
        self.options = opts if isinstance(opts, self.Options) else self.Options()

    @classmethod
    def needs_calibration(cls) -> bool:
        """Whether its statistics need a pass over calibration windows."""
        return pass_for(cls.needs) != "none"

    @classmethod
    def check_options(cls, options, pattern: Pattern) -> None:
        """Checks of the options against the pattern (the options' own checks are in their __post_init__)."""

    @property
    def selection(self) -> str:
        """The mask selection rule of the config: "exact" (also without a config) or "reference"."""
        return getattr(self.config, "selection", "exact")

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def end_block(self) -> None:
        """Called after the last layer of each block: drop anything cached for that block."""

    def prune(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern, group: str) -> PruneResult:
        """Decide the mask from the scores (override to also update the weights)."""
        return PruneResult(select_mask(self.score(weight, stats), pattern, group, self.selection))


SCORERS: Registry[type[Scorer]] = Registry("method")


def register_scorer(name: str):
    """Class decorator: `@register_scorer("wanda")` beside the class. Checks what a newcomer may get wrong at
    registration: unknown statistics in `needs` (with a did-you-mean), an Options class that is not a frozen
    dataclass of supported types with defaults."""

    def deco(cls: type[Scorer]) -> type[Scorer]:
        cls.needs = check_needs(cls.needs, f"method {name!r}")
        check_options_class(cls.Options, f"method {name!r}")
        return SCORERS.register_class(name)(cls)

    return deco


__all__ = ["SCORERS", "LayerStats", "PruneResult", "Scorer", "register_scorer"]
