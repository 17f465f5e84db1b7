"""Which blocks to remove, given importance scores (higher = keep): one-shot or iterative. Pure functions."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

from ..errors import LLMPruneError


def _key(scores: Sequence[float], i: int) -> tuple[float, int]:
    s = float(scores[i])
    return (math.inf if math.isnan(s) else s, i)  # a NaN score never makes a block look unimportant


def lowest_blocks(scores: Sequence[float], k: int, protect: Iterable[int] = ()) -> list[int]:
    """One-shot selection: the k blocks of lowest importance outside `protect`, ties to the lower index;
    returned in ascending order."""
    protected = set(protect)
    candidates = [i for i in range(len(scores)) if i not in protected]
    if k > len(candidates):
        raise LLMPruneError(f"cannot remove {k} blocks: only {len(candidates)} are not protected")
    return sorted(sorted(candidates, key=lambda i: _key(scores, i))[:k])


def select_iteratively(score: Callable[[list[int]], Sequence[float]], remove: Callable[[int], None], n: int, k: int,
                       protect: Iterable[int] = ()) -> list[dict]:
    """Iterative selection: score the remaining blocks, remove the least important one, rescore, k times.

    `score(kept)` gets the original indices of the blocks still there and returns their scores in that order;
    `remove(position)` removes the block at that position of the current model. Returns one record per round:
    {"blocks": original indices scored, "scores": their scores, "removed": [original index]}."""
    protected = set(protect)
    kept = list(range(n))
    rounds = []
    for _ in range(k):
        scores = [float(s) for s in score(list(kept))]
        pos = lowest_blocks(scores, 1, [p for p, i in enumerate(kept) if i in protected])[0]
        rounds.append({"blocks": list(kept), "scores": scores, "removed": [kept[pos]]})
        remove(pos)
        kept.pop(pos)
    return rounds
