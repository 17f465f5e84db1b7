"""Block Influence (ShortGPT, Men et al., 2024, arXiv 2403.03853): BI_i = 1 - mean_t cos(x_i,t, x_{i+1},t),
x_i the hidden state entering block i and x_{i+1} the state leaving it (the block boundary, before any final
norm). A block that barely turns the residual stream has a low BI and is removed first."""

from __future__ import annotations

import torch

from .base import BlockScorer, register_block_scorer


def token_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token, in float32: (..., hidden) x (..., hidden) -> (...); a zero vector (e.g.
    Gemma's padding embedding) has cosine 0."""
    a, b = x_in.float(), x_out.float()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """BI = 1 - mean over tokens of cos(x_in, x_out); x_in, x_out: (batch, seqlen, hidden)."""
    return 1.0 - float(token_cosine(x_in, x_out).double().mean())


@register_block_scorer("block-influence")
class BlockInfluence(BlockScorer):
    needs = "boundary"
    unit = "block influence: 1 - mean cosine (unitless)"

    def stats(self, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        cos = token_cosine(x_in, x_out)  # (batch, seqlen)
        return torch.stack([cos.double().sum(), torch.tensor(float(cos.numel()), dtype=torch.float64, device=cos.device)])

    def importance(self, total: torch.Tensor) -> float:
        return 1.0 - float(total[0] / total[1])
