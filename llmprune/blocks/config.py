"""The block-pruning config: a typed, frozen dataclass that validates itself and round-trips to a dict."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import _DictMixin
from ..errors import LLMPruneError
from .base import BLOCK_SCORERS


@dataclass(frozen=True)
class BlockPruneConfig(_DictMixin):
    """Remove `num_blocks` whole blocks (or `ratio` of them, rounded to the nearest count) scored by `method`;
    blocks in `protect` (negative indices count from the end) are never removed. `iterative`: remove one block,
    rescore the remaining model, repeat; otherwise score once."""

    method: str
    num_blocks: int | None = None
    ratio: float | None = None
    protect: tuple[int, ...] = ()
    iterative: bool = False
    device: str = "auto"  # where each block runs: "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    batch_size: int | None = None  # calibration windows per block forward; None = auto
    logits_budget_mb: float | None = None  # block-ppl/kl: MiB of float32 logits per chunk; None = auto

    def __post_init__(self) -> None:
        BLOCK_SCORERS.get(self.method)
        object.__setattr__(self, "protect", tuple(self.protect))
        if (self.num_blocks is None) == (self.ratio is None):
            raise LLMPruneError("give exactly one of num_blocks and ratio (the blocks to remove)")
        if self.num_blocks is not None and (isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int)
                                            or self.num_blocks < 1):
            raise LLMPruneError(f"num_blocks must be an integer >= 1, got {self.num_blocks!r}")
        if self.ratio is not None and not (0.0 < float(self.ratio) < 1.0):  # NaN fails too
            raise LLMPruneError(f"ratio must lie strictly between 0 and 1, got {self.ratio}")
        for i in self.protect:
            if isinstance(i, bool) or not isinstance(i, int):
                raise LLMPruneError(f"protect must list block indices (integers), got {i!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LLMPruneError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.logits_budget_mb is not None and not float(self.logits_budget_mb) > 0:  # NaN fails too
            raise LLMPruneError(f"logits_budget_mb must be > 0, got {self.logits_budget_mb}")

    def blocks_to_remove(self, n: int) -> int:
        """How many of the model's `n` blocks to remove; at least one must stay."""
        k = self.num_blocks if self.num_blocks is not None else math.floor(self.ratio * n + 0.5)
        if k < 1:
            raise LLMPruneError(f"ratio {self.ratio} of {n} blocks rounds to 0 blocks; use a larger ratio or num_blocks")
        if k >= n:
            raise LLMPruneError(f"cannot remove {k} of {n} blocks: at least one must stay; use num_blocks <= {n - 1}")
        return k
