"""Mask patterns: scores in, boolean prune-mask out (True = set to zero); and writing exact zeros. `Pattern`
(unstructured or N:M, with its sparsity) is the small type the rest of the package names a pattern by.

Pure functions on tensors: they never see a model, a hook or a scorer.

Two selection rules (`selection`): `exact` (the default) prunes exactly `int(sparsity * size)` weights of each
comparison group; `reference` applies the rule of the papers' reference code to the same scores, which depends
on the group only:

- `per-layer` (magnitude, RIA, SparseGPT's lazy blocks): every score at or below the value at index k of the
  ascending sort, k = int(sparsity * size): k+1 weights plus every tie of that value (`threshold-le`);
- `per-row` (Wanda): the first k of each row's stable ascending sort, ties to the lower input index
  (`stable-sort-k`);
- N:M: the M-N lowest of each group by `torch.topk(largest=False)`, exactly M-N (`topk-k`), which is also what
  `exact` picks.

At sparsity 0 nothing is pruned under either rule (the references do not prune then).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import LLMPruneError

_NM = re.compile(r"^(\d+):(\d+)$")
SELECTIONS = ("exact", "reference")  # mask selection rules (see above)


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: unstructured (a fraction of each comparison group) or N:M (at most N non-zeros in
    every M consecutive weights along the input dimension of each row)."""

    kind: str  # "unstructured" | "nm"
    sparsity: float  # fraction of weights set to zero
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> "Pattern":
        if pattern == "unstructured":
            s = 0.5 if sparsity is None else float(sparsity)
            if not (0.0 <= s < 1.0) or math.isnan(s):
                raise LLMPruneError(f"sparsity must be in [0, 1), got {sparsity}")
            return cls("unstructured", s)
        m = _NM.match(pattern)
        if not m:
            raise LLMPruneError(
                f"unknown pattern {pattern!r}; known: unstructured, N:M with N < M (e.g. 2:4, 4:8)"
            )
        n, mm = int(m.group(1)), int(m.group(2))
        if not (1 <= n < mm):
            raise LLMPruneError(f"pattern {pattern}: N:M needs 1 <= N < M, got N={n}, M={mm}")
        implied = 1.0 - n / mm
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise LLMPruneError(
                f"pattern {pattern} fixes the sparsity at {implied:g}; drop --sparsity or set it to {implied:g}"
            )
        return cls("nm", implied, n, mm)

    @property
    def name(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"


def lowest_k(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Indices of the k lowest scores along `dim` (unordered). CPU: `torch.topk` (several times faster than a
    sort there), and on the GPU for small k (N:M groups: twice as fast as a stable sort on an H200, see
    benchmarks/results/gpu_mask_selection.json); otherwise a stable radix sort (topk with a large k is slow
    there)."""
    if scores.device.type == "cpu" or k <= 64:
        return torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
    return torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "per-row", dim: int = 1) -> torch.Tensor:
    """Prune the `int(sparsity * size)` lowest scores of each comparison group.

    `per-row`: each output row competes alone (Wanda's choice); `per-layer`: the whole matrix competes
    (magnitude pruning, RIA). Exactly k weights are pruned even with ties; `torch.topk` (several times faster
    than a full sort) or a stable sort picks them, deterministically for a given input on a given device.
    `dim`: the input dimension of `scores`, 1 for (out, in); 0 for scores laid out (in, out) (SparseGPT's
    transposed lazy blocks), whose per-row groups are then its columns.
    """
    # scores: (out_features, in_features), or (in, out) with dim=0
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if group == "per-row":
        k = int(scores.shape[dim] * sparsity)
        if k:
            idx = lowest_k(scores, k, dim=dim)  # (out, k)
            mask.scatter_(dim, idx, True)
    elif group == "per-layer":
        k = int(scores.numel() * sparsity)
        if k:
            idx = lowest_k(scores.reshape(-1), k, dim=0)
            mask.view(-1)[idx] = True
    else:
        raise LLMPruneError(f"unknown comparison group {group!r}; known: per-row, per-layer")
    return mask


def at_or_below_kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True where a score is <= the value at index k of the ascending sort of all scores (the references'
    per-layer rule): k+1 weights, plus every other weight tied with that value. `torch.kthvalue` (a selection,
    not a full sort) returns the same value as `torch.sort(scores.flatten()).values[k]`."""
    kth = torch.kthvalue(scores.reshape(-1), k + 1).values  # the (k+1)-th smallest = sorted index k
    return scores <= kth


def first_k_of_stable_sort(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Indices of the first k scores along `dim` of a stable ascending sort: the k lowest, ties to the lower
    index (the references' per-row rule)."""
    return torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)


def reference_unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "per-row") -> torch.Tensor:
    """The reference implementations' unstructured selection on (out, in) scores, k = int(sparsity * size).

    `per-layer`: prune every score <= the k-th smallest (index k of the sort), so ties at the threshold are all
    pruned (at least k+1 weights; magnitude and RIA per layer, SparseGPT per lazy block). `per-row`: prune the
    first k of each row's stable sort (Wanda): exactly k, the lower input index first among ties."""
    # scores: (out_features, in_features)
    if group == "per-layer":
        if sparsity == 0:
            return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return at_or_below_kth(scores, int(scores.numel() * sparsity))
    if group == "per-row":
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        k = int(scores.shape[1] * sparsity)
        if k:
            mask.scatter_(1, first_k_of_stable_sort(scores, k, dim=1), True)
        return mask
    raise LLMPruneError(f"unknown comparison group {group!r}; known: per-row, per-layer")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every M consecutive weights along the input dimension of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise LLMPruneError(f"N:M pattern {n}:{m} needs an input width divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M), a copy if scores is a transposed view
    if groups.is_cuda and m <= _RANK_M:
        return (group_ranks(groups) < m - n).reshape(out_f, in_f)
    idx = lowest_k(groups, m - n, dim=-1)  # the M-N lowest of each group
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


_RANK_M = 16  # on the GPU, N:M groups up to this size are ranked elementwise (no topk kernel)


def group_ranks(groups: torch.Tensor) -> torch.Tensor:
    """The rank of every score within its group along the last dimension (0 = lowest; equal scores ranked by
    position, lower first), by M elementwise comparisons: on a GPU several times faster than `topk` over
    groups of 4 (issue 12, 2:4 Wanda). Ranks of a group are a permutation of 0..M-1, so `ranks < M-N` prunes
    exactly M-N."""
    m = groups.shape[-1]
    pos = torch.arange(m, device=groups.device)
    ranks = torch.zeros(groups.shape, dtype=torch.int8, device=groups.device)
    for j in range(m):
        g = groups[..., j : j + 1]
        ranks += (g < groups) | ((g == groups) & (j < pos))
    return ranks


def reference_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The references' N:M selection: in every M consecutive weights of each row, the M-N lowest scores by
    `torch.topk(largest=False)` (always topk, whatever M-N is)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise LLMPruneError(f"N:M pattern {n}:{m} needs an input width divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices  # (out, in/M, M-N)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        from ..registry import unknown_name_message

        raise LLMPruneError(unknown_name_message("selection", selection, list(SELECTIONS)))


def selection_rule(pattern: Pattern, group: str, selection: str = "exact") -> str:
    """The name of the rule `select_mask` applies: `exact-k`, or the references' `threshold-le` (per-layer),
    `stable-sort-k` (per-row) or `topk-k` (N:M)."""
    check_selection(selection)
    if selection == "exact":
        return "exact-k"
    if pattern.kind == "nm":
        return "topk-k"
    return "threshold-le" if group == "per-layer" else "stable-sort-k"


def select_mask(scores: torch.Tensor, pattern: Pattern, group: str = "per-row",
                selection: str = "exact") -> torch.Tensor:
    """Dispatch on the pattern: unstructured within `group`, or N:M (where the group is the M-block); by the
    exact-k rule (`selection="exact"`) or the reference implementations' rule (`"reference"`)."""
    if selection != "exact":
        check_selection(selection)
        if pattern.kind == "unstructured":
            return reference_unstructured_mask(scores, pattern.sparsity, group)
        return reference_nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "unstructured":
        return unstructured_mask(scores, pattern.sparsity, group)
    return nm_mask(scores, pattern.n, pattern.m)


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Write exact +0.0 where `mask` is True (in place; `weight * mask` would leave -0.0)."""
    weight.masked_fill_(mask, 0.0)
    return weight


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every M consecutive weights along the input dimension of every row hold at most N non-zeros."""
    out_f, in_f = weight.shape
    if in_f % m:
        return False
    nz = (weight.reshape(out_f, in_f // m, m) != 0).sum(-1)
    return bool((nz <= n).all())


__all__ = ["Pattern", "SELECTIONS", "lowest_k", "unstructured_mask", "nm_mask", "select_mask", "apply_mask_",
           "check_nm", "at_or_below_kth", "first_k_of_stable_sort", "reference_unstructured_mask", "reference_nm_mask",
           "selection_rule", "check_selection"]
