"""The decision, from measured times: per weight shape, dense or sparse or dispatch, which backend, and the token
count below which each execution mode runs dense. Pure functions on numbers.

* For each mode the threshold is the smallest measured M from which the sparse kernel is at least `min_speedup`
  faster at every larger measured M; below it the layer runs dense.
* Decode is never slower: a shape whose sparse kernel loses at small M (typical: a 1-32 token decode step is
  memory-bound, and the sparse kernels' small-N tiles tend to lose to cuBLAS GEMV) keeps its original dense
  weight beside the compressed one and dispatches on the token count (`policy="dispatch"`, the default). That
  costs 9/16 of the layer's dense bytes on top of the dense weight (1.56x the layer's memory); a shape whose
  sparse kernel wins at every measured M drops the dense weight (0.56x). `policy="sparse-only"` never keeps a
  dense copy: it replaces only the shapes that win everywhere. A shape that never wins stays an `nn.Linear`.
  `policy="always"` replaces every eligible layer without timing.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import LLMPruneError
from .backends import BACKENDS

POLICIES = ("dispatch", "sparse-only", "always")


def dense_threshold(token_counts: Iterable[int], dense_ms, sparse_ms, min_speedup: float = 1.03) -> int | None:
    """Smallest measured token count from which sparse is >= `min_speedup` x faster at every larger count.

    `dense_ms`, `sparse_ms`: times aligned with ascending `token_counts` (None = not measured: a loss).
    Returns None when sparse loses at the largest count (then it is never used)."""
    ms = list(token_counts)
    if sparse_ms is None or dense_ms is None:
        return None
    thr = None
    for m, d, s in reversed(list(zip(ms, dense_ms, sparse_ms))):
        if d is None or s is None or s * min_speedup > d:
            break
        thr = m
    return thr


def decide(token_counts, dense_ms: Mapping[str, list], sparse_ms: Mapping[str, Mapping[str, list]], *,
           policy: str = "dispatch", min_speedup: float = 1.03) -> dict:
    """Choose a backend and per-mode dense thresholds for one shape from measured times.

    `dense_ms`: {mode: [ms per token count]}; `sparse_ms`: {backend: {mode: [ms or None per token count]}}.
    A backend's cost is the sum over modes and token counts of (time it would run) / (dense time), so each
    measured point weighs the same; the cheapest backend wins, ties go to the first in BACKENDS order.
    Returns {"decision": "dense" | "sparse" | "dispatch", "backend", "dense_below": {mode: int | None},
    "keep_dense", "reason"}; a None threshold means that mode always runs dense."""
    ms = list(token_counts)
    modes = [m for m, v in dense_ms.items() if v is not None and all(x is not None for x in v)]
    out = {"decision": "dense", "backend": None, "dense_below": {}, "keep_dense": True, "reason": None}
    if not modes:
        out["reason"] = "no dense timing"
        return out
    candidates = {}
    for backend, per_mode in sparse_ms.items():
        per_mode = per_mode or {}
        thr = {mode: dense_threshold(ms, dense_ms[mode], per_mode.get(mode), min_speedup) for mode in modes}
        if all(t is None for t in thr.values()):
            continue
        cost = 0.0
        for mode in modes:
            for m, d, s in zip(ms, dense_ms[mode], per_mode.get(mode) or [None] * len(ms)):
                cost += (s if thr[mode] is not None and m >= thr[mode] else d) / d
        candidates[backend] = (cost, thr)
    if not candidates:
        out["reason"] = f"sparse kernel not {min_speedup:g}x faster than dense at the largest measured token count"
        return out
    order = {b: i for i, b in enumerate(BACKENDS)}
    backend = min(candidates, key=lambda b: (candidates[b][0], order.get(b, len(order))))
    thr = candidates[backend][1]
    everywhere = all(t == ms[0] for t in thr.values())
    out["backend"] = backend
    if everywhere:
        return {**out, "decision": "sparse", "dense_below": {m: 0 for m in modes}, "keep_dense": False}
    if policy == "sparse-only":
        out["reason"] = "sparse not faster at every measured token count (policy sparse-only keeps no dense copy)"
        out["backend"] = None
        return out
    return {**out, "decision": "dispatch", "dense_below": dict(thr), "keep_dense": True}


def _validate(policy: str, token_counts, min_speedup: float) -> tuple[int, ...]:
    if policy not in POLICIES:
        raise LLMPruneError(f"unknown 2:4 acceleration policy {policy!r}; known: {', '.join(POLICIES)}")
    try:
        counts = tuple(sorted({int(m) for m in token_counts}))
    except (TypeError, ValueError):
        raise LLMPruneError(f"token_counts must be positive integers, got {token_counts!r}") from None
    if not counts or counts[0] < 1:
        raise LLMPruneError(f"token_counts must be positive integers, got {token_counts!r}")
    if not min_speedup > 0:
        raise LLMPruneError(f"min_speedup must be positive, got {min_speedup}")
    return counts
