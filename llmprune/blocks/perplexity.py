"""Perplexity criterion (Shortened LLaMA, Kim et al., 2024, arXiv 2402.02834): the calibration perplexity of
the model with block i removed. The higher the perplexity without it, the more important the block; the
blocks whose removal hurts least go first. Perplexity follows llmprune's protocol: exp of the mean over
windows of each window's mean next-token NLL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import BlockScorer, register_block_scorer


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window, in float32: logits (b, seqlen, vocab), tokens (b, seqlen) -> (b,)."""
    b, s, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none")
    return nll.view(b, s - 1).mean(dim=1)


@register_block_scorer("block-ppl")
class BlockPerplexity(BlockScorer):
    needs = "skip"
    needs_dense = False

    def stats(self, logits: torch.Tensor, tokens: torch.Tensor, dense_logits: torch.Tensor | None = None) -> torch.Tensor:
        nll = window_nll(logits, tokens).double()  # (b,)
        return torch.stack([nll.sum(), torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device)])

    def importance(self, total: torch.Tensor) -> float:
        mean_nll = float(total[0] / total[1])
        return math.exp(mean_nll) if mean_nll < 700 else float("inf")
