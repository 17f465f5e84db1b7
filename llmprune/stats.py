"""Statistics of each linear layer's inputs, and the registry of their collectors (the engine's first part).

A collector names one statistic, the pass over the calibration windows it needs, and how it accumulates one
batch of inputs into a float32 tensor. A scorer asks for statistics by name (`needs = ("sqnorm",)`); the
engine runs the pass they need and hands each layer a `LayerStats` holding them.

    pass      what runs                                    collectors
    none      nothing: the scorer reads the weights only   -
    forward   the block on every calibration window        sqnorm, hessian
    backward  (reserved) gradients of a loss               -

On the ground floor: it imports nothing of llmprune but errors and the registry. The hooks that feed the
collectors live in `calibration/observe.py`.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import LLMPruneError
from .registry import Registry

PASSES = ("none", "forward", "backward")  # in increasing cost; a set of statistics needs the costliest of theirs
_CHUNK = 8192  # tokens per chunk when upcasting inputs for the Hessian, to bound the float32 copy
_MM_OUT_DTYPE: list[bool] = []  # whether torch.mm(..., out_dtype=float32) works on this CUDA build (cached)


class LayerStats:
    """Float32 statistics of one linear layer's inputs X (tokens x in_features), summed over calibration tokens,
    by collector name: `stats["sqnorm"]` or `stats.sqnorm` (in,), `stats.hessian` (in, in).

    Layers that read the very same input tensor (q/k/v, gate/up) share one LayerStats."""

    def __init__(self, ntokens: int = 0, nsamples: int = 0, **values: torch.Tensor):
        self.ntokens = ntokens  # calibration tokens seen
        self.nsamples = nsamples  # calibration windows (sequences) seen
        self.values: dict[str, torch.Tensor] = dict(values)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.values[name]
        except KeyError:
            raise LLMPruneError(f"statistic {name!r} was not collected for this layer (collected: "
                                f"{', '.join(sorted(self.values)) or 'none'}); a scorer names what it reads in "
                                "`needs`") from None

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __getattr__(self, name: str) -> torch.Tensor | None:
        # `stats.sqnorm`: a registered statistic by attribute; None when it was not collected (as before)
        if name.startswith("_") or name not in COLLECTORS:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        return self.__dict__.get("values", {}).get(name)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.values.items())
        return f"LayerStats(ntokens={self.ntokens}, nsamples={self.nsamples}{', ' if shapes else ''}{shapes})"


class Collector:
    """One statistic of a layer's inputs. `accumulate(total, x)` adds the inputs x (tokens, in) of one batch to
    the running float32 `total` (None before the first batch) and returns it, in place where it can."""

    name: str = ""
    needs_pass: str = "forward"
    # True when `accumulate(total, x)` on a given total works in place with torch ops only (traceable by
    # torch.compile), and `accumulate(None, <0 rows>)` gives the zero total: the compiled calibration pass then
    # accumulates inside the block's graph (llmprune.calibration.compiled); otherwise on the inputs after it.
    in_graph: bool = False

    def accumulate(self, total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


COLLECTORS: Registry[Collector] = Registry("statistic")


def register_collector(name: str):
    """Class decorator: `@register_collector("sqnorm")` beside the collector; the registry holds one instance."""

    def deco(cls: type[Collector]) -> type[Collector]:
        if cls.needs_pass not in PASSES:
            raise ValueError(f"collector {name!r}: needs_pass must be one of {PASSES}, got {cls.needs_pass!r}")
        cls.name = name
        COLLECTORS.register(name)(cls())
        return cls

    return deco


def check_needs(needs: str | Iterable[str] | None, who: str = "a scorer") -> tuple[str, ...]:
    """The registered statistic names a scorer needs, as a tuple; an unknown name fails with the known ones and
    a did-you-mean. Accepts the older single string ("none", "sqnorm", "hessian")."""
    if needs is None or needs == "none":
        return ()
    names = (needs,) if isinstance(needs, str) else tuple(needs)
    for n in names:
        if n not in COLLECTORS:
            from .registry import unknown_name_message

            raise LLMPruneError(f"{who} needs " + unknown_name_message("statistic", n, COLLECTORS.names()))
    return names


def pass_for(needs: Iterable[str]) -> str:
    """The pass that collects `needs`: the costliest of their collectors' passes ("none" for no statistics)."""
    return max((COLLECTORS.get(n).needs_pass for n in needs), key=PASSES.index, default="none")


def add_to_stats(stats: LayerStats, x: torch.Tensor, needs: str | Iterable[str]) -> None:
    """Accumulate the inputs x (..., in) of a layer into `stats`: every collector named in `needs`."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    stats.ntokens += x2.shape[0]
    stats.nsamples += x.shape[0] if x.dim() > 2 else 1
    for name in check_needs(needs):
        stats.values[name] = COLLECTORS.get(name).accumulate(stats.values.get(name), x2)


def require_stats(stats: dict[str, LayerStats], layers: Iterable[str], needs: tuple[str, ...], prefix: str,
                  method: str) -> None:
    """Fail loudly when a layer saw no calibration input or a needed statistic is missing (never empty
    statistics handed to a scorer)."""
    if not needs:
        return
    for name in layers:
        st = stats.get(name)
        if st is None or st.ntokens == 0:
            raise LLMPruneError(f"{prefix}.{name} saw no calibration input (an expert no token was routed to, or a "
                                "layer called with keyword input); it cannot be scored by "
                                f"{method}")
        missing = [n for n in needs if n not in st]
        if missing:
            raise LLMPruneError(f"{prefix}.{name}: statistics {', '.join(missing)} were not collected; "
                                f"{method} cannot score it")


# ---------------------------------------------------------------- today's collectors


@register_collector("sqnorm")
class SquaredNorm(Collector):
    """sum_t x_tj^2 = ||X_j||_2^2 per input feature j, (in,) float32 (Wanda, RIA)."""

    needs_pass = "forward"
    in_graph = True  # accumulates in place into a preallocated total: traced into a compiled pass

    def accumulate(self, total, x):
        sq = torch.linalg.vector_norm(x, ord=2, dim=0, dtype=torch.float32).square_()  # (in,)
        return sq if total is None else total.add_(sq)


@register_collector("hessian")
class Hessian(Collector):
    """H = sum_t x_t x_t^T, (in, in) float32 (SparseGPT's 2 X X^T up to the factor, which cancels)."""

    needs_pass = "forward"

    def accumulate(self, total, x):
        if total is None:
            total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        _hessian_update(total, x)
        return total


def _hessian_update(h: torch.Tensor, x2: torch.Tensor) -> None:
    """h += x2^T x2 in float32, exactly as with float32 inputs.

    On CUDA with bf16/fp16 inputs the products of the 8/11-bit mantissas are exact and the matrix units
    accumulate in float32, so a half-precision matmul with float32 output equals the float32 matmul up to
    summation order, at the matrix units' rate instead of the float32 rate (~15x slower). Where torch lacks
    that (`torch.mm(..., out_dtype=)`), the inputs are upcast; no global TF32 flag is touched."""
    half = x2.dtype in (torch.bfloat16, torch.float16) and x2.is_cuda
    if half and _MM_OUT_DTYPE != [False]:
        step, start = 4 * _CHUNK, 0
        if not _MM_OUT_DTYPE:  # first use: find out on one chunk, before anything is added to h
            c = x2[:step]
            try:
                first = torch.mm(c.t(), c, out_dtype=torch.float32)
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, TypeError):
                _MM_OUT_DTYPE[:] = [False]
            else:
                _MM_OUT_DTYPE[:] = [True]
                h.add_(first)
                start = step
        if _MM_OUT_DTYPE == [True]:
            for i in range(start, x2.shape[0], step):
                c = x2[i : i + step]
                h.add_(torch.mm(c.t(), c, out_dtype=torch.float32))
            return
    for i in range(0, x2.shape[0], _CHUNK):  # float32 matmuls, under the user's own TF32 setting
        c = x2[i : i + _CHUNK].float()
        h.addmm_(c.t(), c)


__all__ = ["LayerStats", "Collector", "COLLECTORS", "register_collector", "check_needs", "pass_for", "add_to_stats",
           "require_stats", "PASSES"]
