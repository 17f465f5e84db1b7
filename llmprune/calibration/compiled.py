"""The calibration passes through `torch.compile`: the statistics pass and the propagation pass of each block
run as compiled graphs, so the block's elementwise work (norms, rotary embeddings, activations) is fused, as
in a compiled forward (issue 12: eager hooks kept the block out of the compiler, 1.4x a pass's FLOP floor
against 1.1x compiled on a Llama-2-7B block, H200).

Two compiled entry points with their own code objects, so each has its own graphs and neither sees the other's
hooks: `_plain` (propagation, no hooks) and `_observed` (statistics). In the statistics pass every linear layer
carries one module-level pre-hook (`_collect`):

* collectors that accumulate in place into a preallocated float32 total (`Collector.in_graph`, e.g. sqnorm)
  do so inside the graph: the reduction fuses into the forward, nothing extra is kept;
* the others (the Hessian) get the layer's input returned from the graph, and their ordinary eager
  `accumulate` runs on it right after the forward (inputs read by several layers, q/k/v, counted once).

The transformer blocks of a model share their code and shapes, so one graph serves every block (parameters are
graph inputs); the first compile costs seconds, which the benchmark reports. Sums run in another order than the
eager path: statistics agree to float32 rounding, masks on all but a few weights in a million (a GPU test
checks at least 99.99 %).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..stats import COLLECTORS, LayerStats, check_needs

log = logging.getLogger(__name__)

_KEPT: list = []  # (layer, input) of the current compiled forward, for collectors that accumulate eagerly


def _collect(module, args):
    """Pre-hook traced into the compiled statistics graph."""
    x = args[0]
    x2 = x.reshape(-1, x.shape[-1])
    for collector, total in module._llmprune_in_graph:
        collector.accumulate(total, x2)
    if module._llmprune_keep:
        _KEPT.append((module, x))


def _plain(call, block, hidden):
    return call(block, hidden)


def _observed(call, block, hidden):
    return call(block, hidden)


_COMPILED: dict[str, object] = {}


def compiled(kind: str):
    """The compiled entry point "plain" or "observed" (one per process, shared by every block)."""
    if kind not in _COMPILED:
        fn = {"plain": _plain, "observed": _observed}[kind]
        # round intermediates to the model's dtype where the eager code casts (inductor keeps them in float32
        # by default): without it bf16 propagation drifts from eager and masks agree on 99.87 % instead of 99.99
        _COMPILED[kind] = torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})
    return _COMPILED[kind]


def compile_available(device: torch.device) -> bool:
    """Whether `auto` compiles: on CUDA with triton (inductor's GPU backend) importable."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def in_graph(name: str) -> bool:
    return bool(getattr(COLLECTORS.get(name), "in_graph", False))


@contextlib.contextmanager
def observe_compiled(block: nn.Module, layers: dict[str, nn.Module], need, ctx_calls, inputs):
    """Like `observe`, for the compiled statistics pass: yields (stats, run) where `run(b)` runs batch b of the
    block compiled and accumulates its statistics. `stats[name]`: one LayerStats per layer."""
    need = check_needs(need)
    graph_side = [n for n in need if in_graph(n)]
    eager_side = [n for n in need if not in_graph(n)]
    stats = {name: LayerStats() for name in layers}
    handles = []
    for name, m in layers.items():
        totals = []
        for n in graph_side:
            w = m.weight
            width = w.shape[0] if type(m).__name__ == "Conv1D" else w.shape[1]
            zero = torch.zeros(0, width, device=w.device, dtype=w.dtype)
            total = COLLECTORS.get(n).accumulate(None, zero)  # zeros of the statistic's shape, float32
            stats[name].values[n] = total
            totals.append((COLLECTORS.get(n), total))
        m._llmprune_in_graph = tuple(totals)
        m._llmprune_keep = bool(eager_side)
        handles.append(m.register_forward_pre_hook(_collect))
    by_module = {id(m): name for name, m in layers.items()}
    fn = compiled("observed")

    def run(b: int, device: torch.device) -> None:
        h = inputs[b].to(device, non_blocking=True)
        _KEPT.clear()
        try:
            fn(ctx_calls[b], block, h)
            tokens = h.numel() // h.shape[-1]
            seqs = h.shape[0] if h.dim() > 2 else 1
            seen: dict[tuple, LayerStats] = {}
            for m, x in _KEPT:
                name = by_module[id(m)]
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))  # all alive at once: no address reuse
                if key in seen:  # the same input as an earlier layer (q/k/v, gate/up): one LayerStats, as eager
                    stats[name] = seen[key]
                    continue
                seen[key] = stats[name]
                x2 = x.reshape(-1, x.shape[-1])
                for n in eager_side:
                    stats[name].values[n] = COLLECTORS.get(n).accumulate(stats[name].values.get(n), x2)
            for st in {id(s): s for s in stats.values()}.values():
                st.ntokens += tokens
                st.nsamples += seqs
        finally:
            _KEPT.clear()

    try:
        yield stats, run
    finally:
        for h in handles:
            h.remove()
        for m in layers.values():
            for attr in ("_llmprune_in_graph", "_llmprune_keep"):
                if hasattr(m, attr):
                    delattr(m, attr)


def run_plain(call, block, hidden):
    """One compiled forward of the block without statistics (propagation)."""
    return compiled("plain")(call, block, hidden)


__all__ = ["observe_compiled", "run_plain", "compile_available"]
