"""Mask patterns: scores in, boolean prune-mask out (True = set to zero); and writing exact zeros. `Pattern`
(unstructured or N:M, with its sparsity) is the small type the rest of the package names a pattern by.

Pure functions on tensors: they never see a model, a hook or a scorer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import LLMPruneError

_NM = re.compile(r"^(\d+):(\d+)$")


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


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every M consecutive weights along the input dimension of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise LLMPruneError(f"N:M pattern {n}:{m} needs an input width divisible by {m}, got {in_f}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M), a copy if scores is a transposed view
    idx = lowest_k(groups, m - n, dim=-1)  # the M-N lowest of each group
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, pattern: Pattern, group: str = "per-row") -> torch.Tensor:
    """Dispatch on the pattern: unstructured within `group`, or N:M (where the group is the M-block)."""
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


__all__ = ["Pattern", "lowest_k", "unstructured_mask", "nm_mask", "select_mask", "apply_mask_", "check_nm"]
