"""Magnitude pruning: score = |W| (Han et al., 2015); per-layer comparison as in Wanda's reference baseline."""

from __future__ import annotations

import torch

from .base import LayerStats, Scorer, register_scorer


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|, (out, in)."""
    return weight.abs().float()


@register_scorer("magnitude")
class Magnitude(Scorer):
    needs = ()
    default_group = "per-layer"

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return magnitude_scores(weight)
