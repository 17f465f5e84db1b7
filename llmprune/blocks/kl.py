"""KL criterion: the mean over calibration tokens of KL(P_dense || P_without block i), P the next-token
distribution at each position. A block whose removal leaves the predictions nearly unchanged is removed first."""

from __future__ import annotations

import torch

from .base import BlockScorer, register_block_scorer


def token_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(dense) || softmax(logits)) per position, in float32: (..., vocab) x (..., vocab) -> (...)."""
    logp = torch.log_softmax(dense_logits.float(), dim=-1)
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


@register_block_scorer("block-kl")
class BlockKL(BlockScorer):
    needs = "skip"
    needs_dense = True

    def stats(self, logits: torch.Tensor, tokens: torch.Tensor, dense_logits: torch.Tensor | None = None) -> torch.Tensor:
        kl = token_kl(dense_logits, logits).double()  # (b, seqlen)
        return torch.stack([kl.sum(), torch.tensor(float(kl.numel()), dtype=torch.float64, device=kl.device)])

    def importance(self, total: torch.Tensor) -> float:
        return float(total[0] / total[1])
