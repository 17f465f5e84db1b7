"""Typed, frozen configs that validate themselves and round-trip to plain dicts (YAML/JSON)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import LLMPruneError
from .masks import SELECTIONS, Pattern  # noqa: F401  (they lived here; the masks room owns them now)

log = logging.getLogger(__name__)

COMPARISON_GROUPS = ("per-row", "per-layer")


def _check_unknown(cls, data: dict) -> None:
    known = set(cls.known_keys())
    unknown = sorted(set(data) - known)
    if unknown:
        raise LLMPruneError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def known_keys(cls) -> list[str]:
        """The keys `from_dict` (and a recipe's section) accepts."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _check_unknown(cls, data)
        return cls(**data)  # type: ignore[call-arg]


@dataclass(frozen=True)
class PruneConfig(_DictMixin):
    """What to prune and how: the four parts of the engine by name (the statistics follow from the method).

    `method`: the scorer; `options`: its options (its `Options` dataclass, or a mapping of its fields; None =
    the defaults), stored as the dataclass and written to dicts as a mapping. The flat keys of earlier versions,
    `<method>_<field>` (`ria_alpha`, `sparsegpt_blocksize`, `sparsegpt_percdamp`), are accepted as keyword
    arguments and dict keys: the method's own are folded into `options`; another method's are validated and
    ignored (with a warning when not at their default), as they always were. `cfg.ria_alpha` still reads.
    `comparison_group=None` takes the method's reference default. `selection`: "exact" prunes exactly
    int(sparsity * size) per group; "reference" the reference code's rule (llmprune.masks). `allocation`: how much of each layer is
    pruned (`llmprune.allocation`); `target`: what a decision removes (`llmprune.targets`)."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    comparison_group: str | None = None
    selection: str = "exact"
    options: Any = None  # the method's options; see the class docstring
    allocation: str = "uniform"
    target: str = "mask"
    device: str = "auto"  # where each block is processed: "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    batch_size: int | None = None  # calibration windows per block forward; None = auto
    offload_activations: str = "auto"  # "auto" | "cpu" | "device": where the calibration activations live
    compile: str = "auto"  # calibration passes through torch.compile: "auto" (large jobs on CUDA), "on", "off"

    def __post_init__(self) -> None:
        from .allocation import ALLOCATIONS
        from .options import make_options
        from .scorers import SCORERS  # validated here so a bad config never reaches the model
        from .targets import TARGETS

        scorer = SCORERS.get(self.method)
        pat = Pattern.parse(self.pattern, self.sparsity)
        if self.comparison_group is not None and self.comparison_group not in COMPARISON_GROUPS:
            raise LLMPruneError(
                f"unknown comparison group {self.comparison_group!r}; known: {', '.join(COMPARISON_GROUPS)}"
            )
        if self.selection not in SELECTIONS:
            from .registry import unknown_name_message

            raise LLMPruneError(unknown_name_message("selection", str(self.selection), list(SELECTIONS)))
        object.__setattr__(self, "options", make_options(scorer.Options, self.options, self.method))
        scorer.check_options(self.options, pat)
        ALLOCATIONS.get(self.allocation)
        target = TARGETS.get(self.target)
        if target.unit_kind not in scorer.unit_kinds:
            raise LLMPruneError(f"method {self.method} decides on {', '.join(scorer.unit_kinds)} units; target "
                                f"{self.target} removes {target.unit_kind} units")
        if self.batch_size is not None and self.batch_size < 1:
            raise LLMPruneError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.compile not in ("auto", "on", "off"):
            raise LLMPruneError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.offload_activations not in ("auto", "cpu", "device"):
            raise LLMPruneError(
                f"offload_activations must be auto, cpu or device, got {self.offload_activations!r}"
            )

    @classmethod
    def known_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)] + sorted(_flat_options())

    def __getattr__(self, name: str) -> Any:
        # `cfg.ria_alpha`: an option by its flat key (the method's value, another method's default)
        hit = _flat_options().get(name) if not name.startswith("_") else None
        if hit is None:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        method, option = hit
        if method == self.__dict__.get("method") and self.__dict__.get("options") is not None:
            return getattr(self.__dict__["options"], option)
        from .scorers import SCORERS

        return getattr(SCORERS.get(method).Options(), option)

    @property
    def pattern_spec(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration windows: the scorer's statistics or the allocation's pre-pass."""
        from .allocation import ALLOCATIONS
        from .scorers import SCORERS

        return SCORERS.get(self.method).needs_calibration() or bool(ALLOCATIONS.get(self.allocation).prepass)

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


def _flat_options() -> dict[str, tuple[str, str]]:
    """Flat key -> (method, option) for every option of every registered method ("ria_alpha" -> ("ria", "alpha"))."""
    from .options import flat_key, option_specs
    from .scorers import SCORERS

    out: dict[str, tuple[str, str]] = {}
    reserved = {f.name for f in fields(PruneConfig)}
    for method in SCORERS.names():
        for spec in option_specs(SCORERS.get(method).Options):
            key = flat_key(method, spec.name)
            if key in reserved or key in out:
                raise ValueError(f"option {spec.name} of method {method}: its key {key} is already taken")
            out[key] = (method, spec.name)
    return out


def _fold_flat_options(method: str, options: Any, flat: dict[str, Any]) -> Any:
    """The `options` of `method` with its flat keys folded in; other methods' flat keys validated and dropped."""
    from .options import make_options, options_dict
    from .scorers import SCORERS

    table = _flat_options()
    unknown = sorted(k for k in flat if k not in table)
    if unknown:
        raise TypeError(f"PruneConfig got unexpected keyword argument(s) {', '.join(unknown)}")
    own = {}
    for key, value in flat.items():
        m, option = table[key]
        if m == method:
            own[option] = value
            continue
        cls = SCORERS.get(m).Options
        checked = getattr(make_options(cls, {option: value}, m), option)
        if checked != getattr(cls(), option):
            log.warning("%s is an option of method %s: ignored for method %s", key, m, method)
    if not own:
        return options
    given = options_dict(options)
    twice = sorted(k for k in own if k in given and given[k] != own[k])
    if twice:
        raise LLMPruneError(f"{', '.join(f'{method}_{k}' for k in twice)} given twice, as a key and in options, "
                            "with different values")
    return {**given, **own}


_generated_init = PruneConfig.__init__


@functools.wraps(_generated_init)
def _init_with_flat_options(self, *args, **kwargs) -> None:
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k not in _PRUNE_FIELDS}
    if flat:
        method = kwargs.get("method", args[0] if args else PruneConfig.method)
        at = _OPTIONS_AT
        opts = args[at] if len(args) > at else kwargs.pop("options", None)
        if len(args) > at:
            args = args[:at] + (_fold_flat_options(method, opts, flat),) + args[at + 1:]
        else:
            kwargs["options"] = _fold_flat_options(method, opts, flat)
    _generated_init(self, *args, **kwargs)


_PRUNE_FIELDS = frozenset(f.name for f in fields(PruneConfig))
_OPTIONS_AT = [f.name for f in fields(PruneConfig)].index("options")  # its position among the arguments
PruneConfig.__init__ = _init_with_flat_options  # type: ignore[method-assign]


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
