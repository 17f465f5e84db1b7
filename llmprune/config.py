"""Typed, frozen configs that validate themselves and round-trip to plain dicts (YAML/JSON)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import LLMPruneError

COMPARISON_GROUPS = ("per-row", "per-layer")
NAMED_PATTERNS = ("unstructured", "2:4", "4:8")
SELECTIONS = ("exact", "reference")  # mask selection rules, see llmprune.masks
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


def _check_unknown(cls, data: dict) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LLMPruneError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _check_unknown(cls, data)
        return cls(**data)  # type: ignore[call-arg]


@dataclass(frozen=True)
class PruneConfig(_DictMixin):
    """What to prune and how. `comparison_group=None` takes the method's reference default. `selection`:
    "exact" prunes exactly int(sparsity * size) per group; "reference" the reference code's rule (llmprune.masks)."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    comparison_group: str | None = None
    selection: str = "exact"
    ria_alpha: float = 0.5
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    device: str = "auto"  # where each block is processed: "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    batch_size: int | None = None  # calibration windows per block forward; None = auto
    offload_activations: str = "auto"  # "auto" | "cpu" | "device": where the calibration activations live

    def __post_init__(self) -> None:
        from .scorers import SCORERS  # validated here so a bad config never reaches the model

        SCORERS.get(self.method)
        pat = Pattern.parse(self.pattern, self.sparsity)
        if self.comparison_group is not None and self.comparison_group not in COMPARISON_GROUPS:
            raise LLMPruneError(
                f"unknown comparison group {self.comparison_group!r}; known: {', '.join(COMPARISON_GROUPS)}"
            )
        if self.selection not in SELECTIONS:
            from .registry import unknown_name_message

            raise LLMPruneError(unknown_name_message("selection", str(self.selection), list(SELECTIONS)))
        if self.ria_alpha < 0 or math.isnan(self.ria_alpha):
            raise LLMPruneError(f"ria_alpha must be >= 0, got {self.ria_alpha}")
        if self.sparsegpt_blocksize < 1:
            raise LLMPruneError(f"sparsegpt_blocksize must be >= 1, got {self.sparsegpt_blocksize}")
        if pat.kind == "nm" and self.sparsegpt_blocksize % pat.m:
            raise LLMPruneError(f"sparsegpt_blocksize {self.sparsegpt_blocksize} must be a multiple of M={pat.m}")
        if not (self.sparsegpt_percdamp > 0.0):
            raise LLMPruneError(f"sparsegpt_percdamp must be > 0, got {self.sparsegpt_percdamp}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LLMPruneError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.offload_activations not in ("auto", "cpu", "device"):
            raise LLMPruneError(
                f"offload_activations must be auto, cpu or device, got {self.offload_activations!r}"
            )

    @property
    def pattern_spec(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    @property
    def group(self) -> str:
        from .scorers import SCORERS

        return self.comparison_group or SCORERS.get(self.method).default_group

    @property
    def effective_group(self) -> str:
        """The comparison group actually used: `group` for unstructured sparsity; for N:M every M consecutive
        weights of a row compete (e.g. "per-4-block" for 2:4), whatever `comparison_group` says."""
        pat = self.pattern_spec
        return self.group if pat.kind == "unstructured" else f"per-{pat.m}-block"

    @property
    def selection_rule(self) -> str:
        """The mask rule used: "exact-k", or the references' "threshold-le" (per-layer), "stable-sort-k"
        (per-row) or "topk-k" (N:M); see llmprune.masks.selection_rule."""
        from .masks import selection_rule

        return selection_rule(self.pattern_spec, self.group, self.selection)


@dataclass(frozen=True)
class CalibrationConfig(_DictMixin):
    """Where calibration windows come from and how many: `source` is a named dataset (c4, wikitext2), a local
    .txt/.jsonl/.json/.parquet file, or a saved token tensor (.pt/.safetensors/.npy, int64 [n, seqlen])."""

    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    allow_overlap: bool = False  # allow less text than nsamples x seqlen tokens (windows then overlap)
    bos: str = "auto"  # BOS policy of the windows: auto | always | never (see llmprune.bos)

    def __post_init__(self) -> None:
        from .bos import check_bos_policy

        check_bos_policy(self.bos)
        if self.nsamples < 1:
            raise LLMPruneError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise LLMPruneError(f"seqlen must be >= 2, got {self.seqlen}")


@dataclass(frozen=True)
class EvalConfig(_DictMixin):
    """Perplexity in the papers' protocol: non-overlapping windows of `seqlen`, tail dropped."""

    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    data_dir: str | None = None
    bos: str = "auto"  # BOS policy of the windows (and of zero-shot requests): auto | always | never
    logits_budget_mb: float | None = None  # MiB of float32 logits computed at once; None = auto

    def __post_init__(self) -> None:
        from .bos import check_bos_policy

        check_bos_policy(self.bos)
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.seqlen < 2:
            raise LLMPruneError(f"eval seqlen must be >= 2, got {self.seqlen}")
        if self.logits_budget_mb is not None and not float(self.logits_budget_mb) > 0:  # NaN fails too
            raise LLMPruneError(f"logits_budget_mb must be > 0, got {self.logits_budget_mb}")
        if self.max_windows is not None and self.max_windows < 1:
            raise LLMPruneError(f"max_windows must be >= 1, got {self.max_windows}")


__all__ = ["Pattern", "PruneConfig", "CalibrationConfig", "EvalConfig", "COMPARISON_GROUPS", "SELECTIONS", "field"]
