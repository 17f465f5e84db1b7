"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play"):
S_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a, with a = 0.5; per-layer comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LLMPruneError
from .base import LayerStats, Scorer, register_scorer


def ria_scores(weight: torch.Tensor, sqnorm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Relative importance (row-relative + column-relative |W|) times ||X_j||_2 ** alpha."""
    a = weight.abs().float()  # (out, in)
    row_sum = a.sum(dim=1, keepdim=True)  # (out, 1): sum over inputs of row i
    col_sum = a.sum(dim=0, keepdim=True)  # (1, in): sum over outputs of column j
    ri = a / row_sum + a / col_sum  # a zero row/column gives 0/0: treated as unimportant below
    ri = torch.nan_to_num(ri, nan=0.0)
    return ri * sqnorm.float().sqrt().pow(alpha).unsqueeze(0)


@dataclass(frozen=True)
class RIAOptions:
    alpha: float = field(default=0.5, metadata={"help": "RIA activation exponent a",
                                                "label": "RIA activation exponent a"})

    def __post_init__(self) -> None:
        if self.alpha < 0 or math.isnan(self.alpha):
            raise LLMPruneError(f"ria_alpha must be >= 0, got {self.alpha}")


@register_scorer("ria")
class RIA(Scorer):
    needs = ("sqnorm",)
    Options = RIAOptions
    default_group = "per-layer"

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return ria_scores(weight, stats.sqnorm, self.options.alpha)
