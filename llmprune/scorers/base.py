"""The scorer interface and its registry.

A scorer turns a weight (out_features, in_features) and the statistics of that layer's calibration inputs
into a prune mask; scorers that also update the surviving weights (SparseGPT) return the new weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Pattern
from ..masks import select_mask
from ..registry import Registry


@dataclass
class LayerStats:
    """Float32 statistics of a linear layer's inputs X (tokens x in_features), summed over calibration tokens."""

    sqnorm: torch.Tensor | None = None  # (in,) sum_t x_tj^2 = ||X_j||_2^2
    hessian: torch.Tensor | None = None  # (in, in) sum_t x_t x_t^T
    ntokens: int = 0
    nsamples: int = 0  # calibration windows (sequences)


@dataclass
class PruneResult:
    mask: torch.Tensor  # (out, in) bool, True = pruned
    weight: torch.Tensor | None = None  # (out, in) updated weight, or None if only masked


class Scorer:
    """Base class. `needs` names the input statistics: "none", "sqnorm" or "hessian"."""

    name: str = ""
    needs: str = "none"
    default_group: str = "per-row"

    def __init__(self, config=None):
        self.config = config

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
    """Class decorator: `@register_scorer("wanda")` beside the class."""
    return SCORERS.register_class(name)
