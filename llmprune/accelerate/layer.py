"""`Sparse24Linear`, the module that replaces a 2:4 `nn.Linear`: the weight held compressed, an optional dense copy
run below a token count, and the model-wide helpers that set its run mode or restore plain `nn.Linear` layers.

* Decode is never slower: a shape whose sparse kernel loses at small M keeps its original dense weight beside the
  compressed one and dispatches on the token count; without a kept weight every call is sparse. Below the
  threshold the module costs one comparison more than `nn.Linear`.
* Execution mode: the module uses the "eager" thresholds unless told otherwise; run `set_sparse24_mode(model,
  "graph")` (or the `sparse24_mode` context manager) around CUDA-graph capture or `torch.compile(mode=
  "reduce-overhead")`, where the host cost disappears and the sparse kernel wins at smaller M. Modes "sparse"
  and "dense" force one path (for checks).
* Inference only: no gradients flow through `Sparse24Linear`; `restore_dense_` converts back (e.g. before
  saving, since the saved format stays the dense model with exact zeros).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMPruneError
from .backends import BACKENDS, _constraints, shape_fits
from .ops import DEFAULT_PLAN, _ensure_op, compress_2of4, is_2of4, padded_tokens, sparse_mm_2d

TIMING_MODES = ("eager", "graph")
RUN_MODES = ("eager", "graph", "sparse", "dense")
NEVER = sys.maxsize  # a dense_below threshold meaning "always dense in this mode"


class Sparse24Linear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) held in a 2:4 compressed form for sparse tensor cores.

    `weight`: the kept dense weight (or None); `dense_below`: {"eager" | "graph": token count}, below which the
    kept weight runs `F.linear` (None: that mode always runs dense); without a kept weight every call is sparse.
    `plans`: cuSPARSELt (alg_id, split_k, split_k_mode) per padded token count, from the algorithm search."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, meta: torch.Tensor | None,
                 bias: torch.Tensor | None, backend: str, *, weight: torch.Tensor | None = None,
                 dense_below: Mapping[str, int | None] | None = None, plans: Mapping[int, tuple] | None = None,
                 pad_to: int = 8):
        super().__init__()
        if backend not in BACKENDS:
            raise LLMPruneError(f"unknown 2:4 backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.in_features, self.out_features, self.backend, self.pad_to = in_features, out_features, backend, pad_to
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("meta", meta, persistent=False)
        def as_param(t):
            return t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        self.weight, self.bias = as_param(weight), as_param(bias)
        thr = dict(dense_below or {})
        thr = {m: thr.get(m, thr.get("eager")) for m in TIMING_MODES}  # a mode not measured follows eager
        self.dense_below = ({m: NEVER if t is None else int(t) for m, t in thr.items()} if self.weight is not None
                            else {m: 0 for m in TIMING_MODES})
        self.plans = {int(k): tuple(int(x) for x in v) for k, v in (plans or {}).items()}
        self.mode = "eager"
        self._dense_numel = 0
        self.set_mode("eager")
        _ensure_op()

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str, *, keep_dense: bool = False,
                    dense_below: Mapping[str, int | None] | None = None, plans=None) -> "Sparse24Linear":
        """Compress a 2:4 `nn.Linear` (fp16/bf16, on CUDA); `keep_dense` keeps its weight for small token counts."""
        w = linear.weight
        if not is_2of4(w.data):
            raise LLMPruneError("weight is not 2:4 (more than 2 non-zeros in some group of 4 inputs); prune it first")
        why = shape_fits(backend, w.shape[0], w.shape[1], w.dtype)
        if why:
            raise LLMPruneError(f"cannot use the {backend} 2:4 kernel: {why}")
        packed, meta = compress_2of4(w.data, backend)
        pad_to = _constraints(backend, w.dtype)[2]
        return cls(w.shape[1], w.shape[0], packed, meta, linear.bias, backend, weight=w if keep_dense else None,
                   dense_below=dense_below, plans=plans, pad_to=pad_to)

    def set_mode(self, mode: str) -> None:
        if mode not in RUN_MODES:
            raise LLMPruneError(f"unknown 2:4 run mode {mode!r}; known: {', '.join(RUN_MODES)}")
        self.mode = mode
        if self.weight is None or mode == "sparse":
            thr = 0
        elif mode == "dense":
            thr = NEVER
        else:
            thr = self.dense_below[mode]
        self._dense_numel = NEVER if thr >= NEVER // max(self.in_features, 1) else thr * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self._dense_numel:  # fewer tokens than the threshold: the dense kernel is faster
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.packed.dtype:
            x2 = x2.to(self.packed.dtype)
        m_pad = padded_tokens(x2.shape[0], self.pad_to)
        plan = self.plans.get(m_pad, DEFAULT_PLAN)
        if torch.compiler.is_compiling():
            y = torch.ops.llmprune.sparse24_linear(x2, self.packed, self.meta, self.bias, self.out_features,
                                                   self.backend, *plan, self.pad_to)
        else:
            y = sparse_mm_2d(x2, self.packed, self.meta, self.bias, self.out_features, self.backend, plan,
                             self.pad_to)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An equivalent `nn.Linear` (the kept dense weight, or the compressed one decompressed exactly by a
        product with the identity: each output holds one weight times 1)."""
        if self.weight is not None:
            w = self.weight.data
        else:
            eye = torch.eye(self.in_features, dtype=self.packed.dtype, device=self.packed.device)
            w = sparse_mm_2d(eye, self.packed, self.meta, None, self.out_features, self.backend, DEFAULT_PLAN,
                             self.pad_to).t().contiguous()  # (in, out) -> (out, in)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=w.dtype)
        lin.weight = self.weight if self.weight is not None else nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
                f"dense_copy={self.weight is not None}, dense_below={self.dense_below}, mode={self.mode}")


def sparse24_layers(model: nn.Module) -> dict[str, Sparse24Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}


def set_sparse24_mode(model: nn.Module, mode: str) -> str:
    """Set the run mode of every Sparse24Linear ("eager" | "graph" | "sparse" | "dense"); returns the previous one."""
    if mode not in RUN_MODES:
        raise LLMPruneError(f"unknown 2:4 run mode {mode!r}; known: {', '.join(RUN_MODES)}")
    layers = list(sparse24_layers(model).values())
    prev = layers[0].mode if layers else "eager"
    for layer in layers:
        layer.set_mode(mode)
    return prev


@contextmanager
def sparse24_mode(model: nn.Module, mode: str):
    """Context manager: run the Sparse24Linear layers in `mode` (e.g. "graph" while capturing a CUDA graph)."""
    prev = set_sparse24_mode(model, mode)
    try:
        yield model
    finally:
        set_sparse24_mode(model, prev)


def restore_dense_(model: nn.Module) -> int:
    """Replace every Sparse24Linear by an equivalent nn.Linear in place (e.g. before saving); returns how many."""
    n = 0
    for name, layer in list(sparse24_layers(model).items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.to_linear())
        n += 1
    return n
