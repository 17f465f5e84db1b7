"""Block pruning: score whole Transformer blocks and remove the least important ones.

    >>> from llmprune.blocks import BlockPruneConfig, prune_blocks
    >>> report = prune_blocks(model, BlockPruneConfig("block-influence", num_blocks=8, protect=(0, -1)), tokens)

Scorers (one module each, registered in BLOCK_SCORERS): block-influence (ShortGPT), block-ppl (Shortened
LLaMA), block-kl. `remove_blocks` leaves a smaller model of the same architecture that saves and reloads.
"""

from . import influence, kl, perplexity  # noqa: F401  (registration)
from .base import BLOCK_SCORERS, BlockScorer, register_block_scorer
from .config import BlockPruneConfig
from .plot import plot_block_scores
from .prune import forward_flops_per_token, prune_blocks, score_blocks
from .removal import remove_blocks
from .select import lowest_blocks, select_iteratively

__all__ = ["BlockPruneConfig", "score_blocks", "prune_blocks", "remove_blocks", "plot_block_scores",
           "forward_flops_per_token", "lowest_blocks", "select_iteratively", "BLOCK_SCORERS", "BlockScorer",
           "register_block_scorer"]
