"""The interface of structured (width) scorers: they score groups of coupled rows and columns, not weights.

A structure of one block (its MLP channels, or its attention heads / key-value groups) is a set of `n` groups.
Each layer the structure touches holds a share of every group: some rows (`dim=0`, e.g. a channel's row of
gate and of up, a head's rows of q/k/v) or some columns (`dim=1`, the channel's column of down, the head's
columns of o). A `GroupSlice` describes one layer's share: its (out, in) weight view, the statistics of its
inputs, and `index` (n, k): the k indices along `dim` that group g owns. The width target builds the slices
from the architecture map; a structured scorer turns them into one float32 score per group (higher = more
important, kept) and, if it compensates, into a bias for the layers whose columns are removed.

Pure math on tensors: nothing here knows a model, a config or a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..stats import LayerStats
from .base import Scorer


@dataclass(frozen=True)
class GroupSlice:
    """One layer's share of the groups of a structure.

    `layer`: the layer's name in the block; `role`: what it is in the structure ("in" for a layer whose rows
    the groups own — gate, up, fc1, q, k, v; "out" for the layer whose input columns they own — down, fc2, o);
    `dim`: 0 (rows) or 1 (columns); `weight`: the (out, in) view; `stats`: statistics of the layer's inputs
    (None for a scorer that needs none); `index`: (n_groups, k) long, the indices along `dim` of each group."""

    layer: str
    role: str
    dim: int
    weight: torch.Tensor
    stats: LayerStats | None
    index: torch.Tensor

    @property
    def n_groups(self) -> int:
        return int(self.index.shape[0])

    def members(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """`t` (default the weight, (out, in)) gathered per group: (n_groups, k, other) with `other` the size of
        the dimension not removed (rows: in; columns: out)."""
        t = self.weight if t is None else t
        t = t if self.dim == 0 else t.t()
        return t[self.index]


class StructuredScorer(Scorer):
    """Base class of width criteria. `unit_kinds`: "channel" (MLP channels) and "head" (attention heads or
    key-value groups). Implement `group_scores`; override `compensation` to add the removed groups' mean
    contribution back as a bias (FLAP)."""

    unit_kinds: tuple[str, ...] = ("channel", "head")
    default_group = "per-layer"

    def group_scores(self, slices: Sequence[GroupSlice], kind: str) -> torch.Tensor:
        """One float32 score per group (n_groups,), higher = keep. `kind`: "channel" or "head"."""
        raise NotImplementedError

    def compensation(self, slices: Sequence[GroupSlice], remove: torch.Tensor, kind: str
                     ) -> dict[str, torch.Tensor] | None:
        """Biases to add to the output layers (by layer name, (out,) float32) once the groups with
        `remove[g] = True` are gone; None: no compensation."""
        return None

    def score(self, weight, stats):  # pragma: no cover - structured scorers decide on groups
        raise TypeError(f"method {self.name!r} scores groups of weights (width patterns), not single weights")


def check_slices(slices: Sequence[GroupSlice]) -> int:
    """The common group count of `slices` (they must agree); raises ValueError otherwise."""
    counts = {s.n_groups for s in slices}
    if len(counts) != 1:
        raise ValueError(f"slices disagree on the number of groups: {sorted(counts)}")
    return counts.pop()


__all__ = ["GroupSlice", "StructuredScorer", "check_slices"]
