"""Wanda (Sun et al., 2023, arXiv 2306.11695): S_ij = |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from .base import LayerStats, Scorer, register_scorer


def wanda_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """|W| (out, in) times the input-feature norms sqrt(sum_t x_tj^2) (in,) broadcast over rows."""
    return weight.abs().float() * sqnorm.float().sqrt().unsqueeze(0)


@register_scorer("wanda")
class Wanda(Scorer):
    needs = ("sqnorm",)
    default_group = "per-row"

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return wanda_scores(weight, stats.sqnorm)
