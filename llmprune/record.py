"""The record of a prune job (`llmprune.json`) as a typed, frozen dataclass: `run_prune_job` builds it; the model
card, `reproduce`, `push` and the CLI's summary read it by attribute.

`JobRecord.to_dict()` gives exactly the keys of `llmprune.json`, in its order; `JobRecord.from_dict()` reads one
back, also from older files: a key a file lacks takes its default (None, or an empty part), a key this version
does not know is kept (`extra`) and written back after the known ones. The parts other rooms produce and own
(each config's `to_dict()`, perplexity results, the zero-shot evaluation, timings) stay plain dicts inside it.

Key by key (the order of `llmprune.json`):

- ``model``, ``model_kind`` (hub, folder, gguf, default), ``base_model`` (only when given), ``license``: the
  model, by portable name (`export.provenance`); ``architecture``: the model's class name.
- ``config`` (`JobConfig`): the options as given: ``prune``, ``blocks``, ``calibration``, ``eval`` (each config's
  `to_dict()`, or None), the working ``dtype`` and the ``save_dtype``.
- ``calibration`` (`CalibrationRecord`): the windows drawn: source, description, count, length, token sha256, BOS
  record, a file source's sha256. ``seed``, ``versions``, ``device``.
- ``gguf`` (`GgufRecord`): a GGUF input's file, size, storage dtype, sha256, whether the conversion cache was used.
- ``blocks`` (`BlockRecord`): what block removal did. ``sparsity`` (zeros of the blocks' linear weights),
  ``model_sparsity`` (of all parameters), ``zeros_before`` and ``zeros_after`` (`Zeros`).
- ``resolved`` (`Resolved`): what the options resolved to. ``layer_sparsity``, ``timings``, ``block_timings``,
  ``peak_memory``, ``perplexity`` (`Perplexity`: dense and pruned), ``evaluation`` (the --eval results).
- ``data_files`` (only when data files were read): {path relative to the data folder: {sha256, bytes}}.
- ``output_dir``: where the folder was saved; only in the record `run_prune_job` returns, not in the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

OMIT_NONE = {"omit_none": True}  # field metadata: the key is left out of to_dict() while the value is None


@dataclass(frozen=True, kw_only=True)
class Part:
    """A typed piece of the record: known keys as fields (in the file's order), unknown ones kept in `extra`.

    Fields whose class is named in `PARTS` hold that class; a Mapping given for one is read with its
    `from_dict`, so a part can be built from the dict the room that produced it returns."""

    PARTS: ClassVar[dict[str, type[Part]]] = {}
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # known keys a file lacked

    def __post_init__(self) -> None:
        for name, cls in self.PARTS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, cls.from_dict(value))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "absent")]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The part of `data`; keys it lacks take their defaults (and stay out of `to_dict()` while unset), keys
        this class doesn't know go to `extra`."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got {type(data).__name__}")
        known = cls.field_names()
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known},
                   absent=frozenset(k for k in known if k not in data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field by its key, then `extra`. Left out: a None field with `OMIT_NONE`, and a
        key the file it was read from lacked while its value is still the default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "absent"):
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            if f.name in self.absent and value == _default(f):
                continue
            out[f.name] = value.to_dict() if isinstance(value, Part) else value
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True, kw_only=True)
class JobConfig(Part):
    """The options as given (`config`): each config's own `to_dict()` (PruneConfig, BlockPruneConfig,
    CalibrationConfig, EvalConfig; `from_dict` reads each back), the working dtype and the dtype it was saved in."""

    prune: dict | None = None
    blocks: dict | None = None
    calibration: dict = field(default_factory=dict)
    eval: dict | None = None
    dtype: str | None = None
    save_dtype: str | None = field(default=None, metadata=OMIT_NONE)  # older records: absent (saved in `dtype`)


@dataclass(frozen=True, kw_only=True)
class CalibrationRecord(Part):
    """The calibration windows drawn (`CalibrationData.to_dict()`), a file source named by base name and sha256."""

    source: str | None = None
    description: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    token_sha256: str | None = None
    bos: dict | None = None
    file_sha256: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class GgufRecord(Part):
    """A GGUF input: its file name and size, storage dtype ("quantized" for quantized blocks), sha256, and
    whether the conversion was read from the cache."""

    file: str | None = None
    bytes: int | None = None
    dtype: str | None = None
    sha256: str | None = None
    from_cache: bool | None = None


@dataclass(frozen=True, kw_only=True)
class BlockRecord(Part):
    """What block removal did (`blocks.prune_blocks`' report)."""

    config: dict | None = None
    calibration: dict | None = None
    method: str | None = None
    num_blocks_before: int | None = None
    num_blocks_after: int | None = None
    protected: list = field(default_factory=list)
    scores: list | None = None
    rounds: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    removal_order: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    params_before: int | None = None
    params_after: int | None = None
    flops_per_token_before: float | None = None
    flops_per_token_after: float | None = None
    config_updates: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class Zeros(Part):
    """Exact zeros (`evaluation.compression.zero_counts`): fractions and counts, of the blocks' linear weights and
    of all parameters (tied weights once)."""

    block_linear: float | None = None
    model: float | None = None
    block_linear_zeros: int | None = None
    block_linear_params: int | None = None
    model_zeros: int | None = None
    model_params: int | None = None


@dataclass(frozen=True, kw_only=True)
class Resolved(Part):
    """What the options left to defaults resolved to, only what applies to the job: the comparison group, the
    mask selection rule, the data folders read ("hub" for the Hub), the zero-shot requests' context length."""

    comparison_group: str | None = field(default=None, metadata=OMIT_NONE)
    selection_rule: str | None = field(default=None, metadata=OMIT_NONE)
    data_dir: dict = field(default_factory=dict)
    zero_shot_max_length: int | None = field(default=None, metadata=OMIT_NONE)


@dataclass(frozen=True, kw_only=True)
class Perplexity(Part):
    """Perplexity before and after pruning: {dataset: result} each (`evaluation.perplexity.perplexity`), or None."""

    dense: dict | None = None
    pruned: dict | None = None


@dataclass(frozen=True, kw_only=True)
class JobRecord(Part):
    """The record of one prune job, the typed form of `llmprune.json` (see the module docstring, key by key)."""

    PARTS: ClassVar[dict[str, type[Part]]] = {
        "config": JobConfig, "calibration": CalibrationRecord, "gguf": GgufRecord, "blocks": BlockRecord,
        "zeros_before": Zeros, "zeros_after": Zeros, "resolved": Resolved, "perplexity": Perplexity}

    model: str | None = None
    model_kind: str | None = field(default=None, metadata=OMIT_NONE)  # older records: absent
    base_model: str | None = field(default=None, metadata=OMIT_NONE)
    license: dict | str | None = None
    architecture: str | None = None
    config: JobConfig = field(default_factory=JobConfig)
    calibration: CalibrationRecord | None = None
    seed: int | None = None
    versions: dict = field(default_factory=dict)
    device: str | None = None
    gguf: GgufRecord | None = None
    blocks: BlockRecord | None = None
    sparsity: float | None = None
    model_sparsity: float | None = None
    zeros_before: Zeros | None = None
    zeros_after: Zeros | None = None
    resolved: Resolved = field(default_factory=Resolved)
    layer_sparsity: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    block_timings: list = field(default_factory=list)
    peak_memory: dict | None = None
    perplexity: Perplexity = field(default_factory=Perplexity)
    evaluation: dict | None = None
    data_files: dict | None = field(default=None, metadata=OMIT_NONE)
    output_dir: str | None = field(default=None, metadata=OMIT_NONE)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, cls in (("config", JobConfig), ("resolved", Resolved), ("perplexity", Perplexity)):
            if getattr(self, name) is None:  # an older or partial file's null: the empty part
                object.__setattr__(self, name, cls())

    @classmethod
    def of(cls, record: JobRecord | Mapping[str, Any]) -> JobRecord:
        """`record` itself, or the JobRecord of an llmprune.json dict."""
        return record if isinstance(record, JobRecord) else cls.from_dict(record)

    def with_output_dir(self, path: str) -> JobRecord:
        return dataclasses.replace(self, output_dir=path)


__all__ = ["JobRecord", "JobConfig", "CalibrationRecord", "GgufRecord", "BlockRecord", "Zeros", "Resolved",
           "Perplexity", "Part"]
