"""KL criterion: the mean over calibration tokens of KL(P_dense || P_without block i), P the next-token
distribution at each position. A block whose removal leaves the predictions nearly unchanged is removed first."""

from __future__ import annotations

import torch

from .base import BlockScorer, register_block_scorer


def token_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(dense) || softmax(logits)) per position, in float32: (..., vocab) x (..., vocab) -> (...).

    Computed in place after the two log-softmaxes (p * (log p - log q), summed), so a chunk holds the two
    inputs and two float32 copies (`BlockKL.logit_copies`)."""
    logp = torch.log_softmax(dense_logits.float(), dim=-1)
    diff = torch.log_softmax(logits.float(), dim=-1).neg_().add_(logp)  # log p - log q
    return diff.mul_(logp.exp_()).sum(dim=-1)


@register_block_scorer("block-kl")
class BlockKL(BlockScorer):
    needs = "skip"
    needs_dense = True
    logit_copies = 6  # dense and candidate logits, their float32 upcasts, log p and the difference
    unit = "KL(dense || without the block), nats per token"

    def stats(self, logits: torch.Tensor, targets: torch.Tensor, dense_logits: torch.Tensor | None = None) -> torch.Tensor:
        kl = token_kl(dense_logits, logits).double()  # (...): every position, the last of a window too
        return torch.stack([kl.sum(), torch.tensor(float(kl.numel()), dtype=torch.float64, device=kl.device)])

    def importance(self, total: torch.Tensor) -> float:
        return float(total[0] / total[1])
