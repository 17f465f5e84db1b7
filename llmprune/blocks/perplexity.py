"""Perplexity criterion (Shortened LLaMA, Kim et al., 2024, arXiv 2402.02834): the calibration perplexity of
the model with block i removed. The higher the perplexity without it, the more important the block; the
blocks whose removal hurts least go first. Perplexity follows llmprune's protocol, exp of the mean over
windows of each window's mean next-token NLL; the calibration windows are equally long, so that is the mean
over all predicted tokens, which is what is summed here, chunk by chunk."""

from __future__ import annotations

import math

import torch

from ..logits import IGNORE, NLL_COPIES, token_nll
from .base import BlockScorer, register_block_scorer


@register_block_scorer("block-ppl")
class BlockPerplexity(BlockScorer):
    needs = "skip"
    needs_dense = False
    logit_copies = NLL_COPIES
    unit = "calibration perplexity without the block"

    def stats(self, logits: torch.Tensor, targets: torch.Tensor, dense_logits: torch.Tensor | None = None) -> torch.Tensor:
        nll = token_nll(logits, targets).double()  # (...), 0 where there is no next token
        return torch.stack([nll.sum(), (targets != IGNORE).sum().double()])

    def importance(self, total: torch.Tensor) -> float:
        mean_nll = float(total[0] / total[1])
        return math.exp(mean_nll) if mean_nll < 700 else float("inf")
