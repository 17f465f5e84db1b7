"""The block-scorer interface and its registry.

A block scorer turns tensors into the importance of one Transformer block (higher = keep). It never sees a
model: the plumbing in `states.py` hands it, batch by batch, either

* `needs = "boundary"`: the hidden states entering and leaving block i, `stats(x_in, x_out)`, or
* `needs = "skip"`: the logits of the model with block i skipped at a chunk of positions (..., vocab), the
  next token at each position (..., IGNORE = -100 where a window ends) and (when `needs_dense`) the dense
  model's logits there, `stats(logits, targets, dense_logits)`; a chunk holds as many positions as
  `logit_copies` float32 copies of its logits fit in the logits budget (`llmprune.logits`);

`stats` returns a 1-D float64 tensor of sums that are added over batches, and `importance(total)` turns the
total into the block's score.
"""

from __future__ import annotations

import torch

from ..registry import Registry


class BlockScorer:
    """Base class of the block-importance methods."""

    name: str = ""
    needs: str = "boundary"  # "boundary" | "skip"
    needs_dense: bool = False  # "skip" scorers: whether they compare with the dense model's logits
    logit_copies: int = 4  # "skip" scorers: (positions, vocab) float32 tensors `stats` holds at once, inputs included
    unit: str = "score"  # what importance() measures, in its unit: the y label of plot_block_scores

    def stats(self, *tensors: torch.Tensor) -> torch.Tensor:  # (k,) float64 sums over one batch or chunk
        raise NotImplementedError

    def importance(self, total: torch.Tensor) -> float:
        raise NotImplementedError


BLOCK_SCORERS: Registry[type[BlockScorer]] = Registry("block-pruning method")


def register_block_scorer(name: str):
    """Class decorator: `@register_block_scorer("block-influence")` beside the class."""
    return BLOCK_SCORERS.register_class(name)
