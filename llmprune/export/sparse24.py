"""2:4 acceleration: run a 2:4-pruned model's linear layers on the GPU's semi-structured sparse tensor cores.

Sparse Tensor Cores (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378) multiply
a matrix holding at most 2 non-zeros in every 4 consecutive weights (stored compressed: the kept values plus 2-bit
indices, 9/16 of the dense bytes in 16-bit) by a dense matrix at up to twice the dense rate. This module is the
separate, optional acceleration step of STYLE.md principle 7: pruning writes exact zeros; `accelerate_2of4_`
turns the blocks' 2:4 `nn.Linear` layers of a model already on a CUDA device into `Sparse24Linear` in memory.

Design (each point decided by reading the PyTorch sources and the issue's measurements):

* Kernel-level API, not the tensor subclass. `torch.sparse.to_sparse_semi_structured` wraps the weight in a
  tensor subclass whose `F.linear` goes through `__torch_dispatch__` and a padding custom op, and every
  `_cslt_sparse_mm` call builds and destroys its cuSPARSELt descriptors and plan (pytorch issue 153825 measured
  ~0.46 ms of host time per call): many times slower than dense below ~2048 tokens when run eagerly. We call
  the kernels directly: `torch._cslt_compress` once per layer, then `torch._cslt_sparse_mm(W_c, x^T,
  bias, transpose_result=True, alg_id=..)` (cuSPARSELt computes sparse(A) @ dense(B), so y = x W^T is
  (W_c @ x^T)^T; `transpose_result` writes it directly as a row-major (tokens, out) tensor and a transposed
  view of x is accepted without a copy), or CUTLASS's `torch._sparse_semi_structured_linear` (fallback:
  `_sparse_semi_structured_mm`). The per-call host cost that remains is removed by CUDA graphs, which is why
  timings are taken both ways (below).
* Which `_cslt_sparse_mm` keywords exist is read from the op's schema, since they changed across releases
  (`alg_id` only; then `split_k` with a bool `split_k_one_kernel`; now `split_k` with an int `split_k_mode`);
  the algorithm search uses `torch._C._cusparselt.mm_search` (alg_id, split_k, split-k mode) where present,
  else the older, deprecated `torch._cslt_sparse_mm_search` (alg_id only). The report records which ran.
* Padding: the dense operand's token dimension is padded with zero rows to the backend's minimum (8 rows for
  16-bit dtypes, read from `SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS` where present), so a decode
  step with 1 token computes 8 rows and returns the first. Weights must be multiples of (16, 16) for
  cuSPARSELt and (32, 64) for CUTLASS; only float16 and bfloat16 are converted (the float32 kernels are TF32
  with 1:2 sparsity, which a 2:4 weight does not satisfy).
* Decide by measuring, once per distinct (out_features, in_features, dtype): dense `F.linear` against each
  backend at the workload's token counts M, median of `repeats` CUDA-event timings of `iters` back-to-back
  calls after a warm-up, in two modes: "eager" (calls launched from Python: the host cost counts) and
  "graph" (the same calls replayed from a CUDA graph: kernel time only). The loop cycles through enough copies
  of the weight that they overflow the L2 cache, as a model's layers do (one 4096x4096 bf16 weight reused back
  to back would stay in H100's 50 MB L2 and flatter the smaller compressed one). For cuSPARSELt the
  algorithm search runs at each M; the fastest of the default plan, the found one and those found at the other
  token counts (by kernel time, graph-replayed) is kept for that M.
  For each mode the threshold is the smallest measured M from which the sparse kernel is at least
  `min_speedup` faster at every larger measured M; below it the layer runs dense.
* Decode is never slower: a shape whose sparse kernel loses at small M (typical: a 1-32 token decode step is
  memory-bound, and the sparse kernels' small-N tiles tend to lose to cuBLAS GEMV) keeps its original dense weight beside
  the compressed one and dispatches on the token count (`policy="dispatch"`, the default). That costs 9/16 of
  the layer's dense bytes on top of the dense weight (1.56x the layer's memory); a shape whose sparse kernel
  wins at every measured M drops the dense weight (0.56x). `policy="sparse-only"` never keeps a dense copy:
  it replaces only the shapes that win everywhere. A shape that never wins stays an `nn.Linear`.
* Execution mode: the module uses the "eager" thresholds unless told otherwise; run `set_sparse24_mode(model,
  "graph")` (or the `sparse24_mode` context manager) around CUDA-graph capture or `torch.compile(mode=
  "reduce-overhead")`, where the host cost disappears and the sparse kernel wins at smaller M. Modes "sparse"
  and "dense" force one path (for checks). Under `torch.compile` the kernel is a custom op with a fake
  (meta) implementation, because aten's meta function for `_cslt_sparse_mm` takes the 1-D compressed weight's
  length for its row count (the benchmark uses plain CUDA graphs; the compiled path is not measured there).
  Below the threshold the module costs one comparison more than `nn.Linear`.
* Every replaced layer is checked against dense `F.linear` on random input (relative error <= `verify_tol`);
  a layer that fails stays dense, with the reason in the report. The report's "verify" section gives the largest
  such error over the converted layers, next to the bf16 floor: the same input through dense bf16 `F.linear`
  and through the sparse kernel, each against a float32 product of the same weight.
* CUTLASS: PyTorch builds its semi-structured CUTLASS kernels for compute capability 8.x only (on 9.0 they raise
  "Supported only on GPUs with compute capability 8.x"), so that backend is reported unavailable elsewhere;
  cuSPARSELt covers 8.x and 9.x.

This is a runtime (in-memory) conversion for inference only: the saved format stays the dense safetensors
model with exact zeros (`restore_dense_` converts back before saving), and no gradients flow through
`Sparse24Linear`. Without CUDA, without a semi-structured backend, or with no eligible layer, nothing is
replaced and the report says why.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMPruneError
from ..masks import check_nm
from ..models import find_blocks, linear_layers

log = logging.getLogger(__name__)

BACKENDS = ("cusparselt", "cutlass")
POLICIES = ("dispatch", "sparse-only", "always")
TIMING_MODES = ("eager", "graph")
RUN_MODES = ("eager", "graph", "sparse", "dense")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_TOKEN_COUNTS = (1, 8, 32, 128, 512, 2048, 8192)
NEVER = sys.maxsize  # a dense_below threshold meaning "always dense in this mode"
DEFAULT_PLAN = (0, 1, -1)  # cuSPARSELt (alg_id, split_k, split_k_mode): the library's default algorithm

# (sparse_min_rows, sparse_min_cols, dense_min_rows) per backend for 16-bit dtypes, used where torch has no table
_FALLBACK_CONSTRAINTS = {"cusparselt": (16, 16, 8), "cutlass": (32, 64, 8)}

warnings.filterwarnings("ignore", message=".*_sparse_semi_structured_linear is deprecated.*")
warnings.filterwarnings("ignore", message=".*torch._cslt_sparse_mm_search is deprecated.*")
warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")


# ---------------------------------------------------------------- pure helpers

def is_2of4(weight: torch.Tensor) -> bool:
    """True if every 4 consecutive weights along the input dimension of every row hold at most 2 non-zeros."""
    return weight.dim() == 2 and check_nm(weight, 2, 4)


def shape_key(layer: nn.Module) -> tuple[int, int, str]:
    """(out_features, in_features, dtype name): layers with one key share one measurement."""
    out_f, in_f = layer.weight.shape
    return int(out_f), int(in_f), str(layer.weight.dtype).removeprefix("torch.")


def group_by_shape(layers: Mapping[str, nn.Module]) -> dict[tuple[int, int, str], list[str]]:
    """Layer names grouped by `shape_key`, groups and names in first-seen order."""
    groups: dict[tuple[int, int, str], list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(shape_key(layer), []).append(name)
    return groups


def padded_tokens(m: int, multiple: int) -> int:
    """The token count rounded up to the backend's multiple (the dense operand's minimum)."""
    return -(-m // multiple) * multiple


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


# ---------------------------------------------------------------- backends (kernel level)

def _constraints(backend: str, dtype: torch.dtype) -> tuple[int, int, int] | None:
    """(sparse_min_rows, sparse_min_cols, dense_pad) for the backend and dtype, None if unsupported."""
    if dtype not in SUPPORTED_DTYPES:
        return None
    cls = getattr(torch.sparse, {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
                                 "cutlass": "SparseSemiStructuredTensorCUTLASS"}[backend], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    c = table.get(dtype)
    if c is None:
        return _FALLBACK_CONSTRAINTS[backend]
    rows = getattr(c, "sparse_min_rows", getattr(c, "min_rows", _FALLBACK_CONSTRAINTS[backend][0]))
    cols = getattr(c, "sparse_min_cols", getattr(c, "min_cols", _FALLBACK_CONSTRAINTS[backend][1]))
    pad = max(getattr(c, "dense_min_rows", 8), getattr(c, "dense_min_cols", 8))
    return int(rows), int(cols), int(pad)


def shape_fits(backend: str, out_features: int, in_features: int, dtype: torch.dtype) -> str | None:
    """None if the backend takes this weight, else the reason it does not."""
    c = _constraints(backend, dtype)
    if c is None:
        return f"dtype {str(dtype).removeprefix('torch.')} has no 2:4 kernel (use bfloat16 or float16)"
    rows, cols, _ = c
    if out_features % rows or in_features % cols:
        return f"weight ({out_features}, {in_features}) is not a multiple of ({rows}, {cols})"
    return None


def cslt_api() -> str:
    """Which keywords `torch._cslt_sparse_mm` takes here: split_k_mode | split_k_one_kernel | alg_id | basic."""
    try:
        names = {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    except (AttributeError, RuntimeError):
        return "missing"
    for api in ("split_k_mode", "split_k_one_kernel", "alg_id"):
        if api in names:
            return api
    return "basic"


def available_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends usable on `device`, and for the others the reason why not."""
    ok, why = [], {}
    if device.type != "cuda" or not torch.cuda.is_available():
        return ok, {b: "CUDA is not available" for b in BACKENDS}
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return ok, {b: f"compute capability {cap[0]}.{cap[1]} < 8.0 has no sparse tensor cores" for b in BACKENDS}
    cslt = getattr(torch.backends, "cusparselt", None)
    if not hasattr(torch, "_cslt_compress") or cslt_api() == "missing":
        why["cusparselt"] = "this torch has no cuSPARSELt ops"
    elif cslt is None or not cslt.is_available():
        why["cusparselt"] = "torch was built without cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    else:
        ok.append("cusparselt")
    if torch.version.hip is not None:
        why["cutlass"] = "CUTLASS semi-structured kernels are not built on ROCm"
    elif cap[0] != 8:  # torch's CUTLASS kernels are Ampere/Ada only: they raise "Supported only on ... 8.x" elsewhere
        why["cutlass"] = (f"PyTorch's CUTLASS semi-structured kernels run only on compute capability 8.x; "
                          f"this GPU is {cap[0]}.{cap[1]}")
    elif not (hasattr(torch, "_sparse_semi_structured_linear") or hasattr(torch, "_sparse_semi_structured_mm")):
        why["cutlass"] = "this torch has no CUTLASS semi-structured ops"
    else:
        ok.append("cutlass")
    return ok, why


def compress_2of4(weight: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backend's compressed form of a 2:4 weight (out_features, in_features): (packed, metadata or None)."""
    w = weight.detach().contiguous()
    if backend == "cusparselt":
        return torch._cslt_compress(w), None  # 1-D: kept values then metadata, numel * 9/16 elements
    cls = getattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS", None)
    if cls is not None and hasattr(cls, "from_dense"):
        t = cls.from_dense(w)
        return t.packed, t.meta
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    return sparse_semi_structured_from_dense_cutlass(w)


def _cslt_kwargs(plan: tuple[int, int, int]) -> dict:
    alg_id, split_k, split_k_mode = plan
    api, kw = cslt_api(), {}
    if alg_id and api != "basic":
        kw["alg_id"] = int(alg_id)
    if split_k != 1:
        if api == "split_k_mode":
            kw.update(split_k=int(split_k), split_k_mode=int(split_k_mode))
        elif api == "split_k_one_kernel":
            kw.update(split_k=int(split_k), split_k_one_kernel=bool(split_k_mode))
    return kw


def _cslt_mm(x2, packed, meta, bias, out_features, plan):
    # y (tokens, out) = (W_c @ x^T)^T, written row-major by transpose_result; x^T is a view (no copy)
    return torch._cslt_sparse_mm(packed, x2.t(), bias=bias, transpose_result=True, **_cslt_kwargs(plan))


def _cutlass_mm(x2, packed, meta, bias, out_features, plan):
    if hasattr(torch, "_sparse_semi_structured_linear"):
        return torch._sparse_semi_structured_linear(x2, packed, meta, bias=bias)
    y = torch._sparse_semi_structured_mm(packed, meta, x2.t()).t().contiguous()  # (out, tokens) -> (tokens, out)
    return y if bias is None else y + bias


_MM: dict[str, Callable] = {"cusparselt": _cslt_mm, "cutlass": _cutlass_mm}


def sparse_mm_2d(x2: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor | None, bias: torch.Tensor | None,
                 out_features: int, backend: str, plan: tuple[int, int, int] = DEFAULT_PLAN,
                 pad_to: int = 8) -> torch.Tensor:
    """y = x2 W^T + b for x2 (tokens, in_features), W held compressed; tokens padded with zero rows to `pad_to`."""
    m = x2.shape[0]
    if m == 0:
        return x2.new_empty((0, out_features))
    pad = (-m) % pad_to
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    elif not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
    y = _MM[backend](x2, packed, meta, bias, out_features, plan)  # (padded tokens, out)
    return y[:m] if pad else y


def cslt_search(packed: torch.Tensor, x2: torch.Tensor, bias: torch.Tensor | None) -> tuple[tuple[int, int, int], str]:
    """cuSPARSELt's algorithm search for this product: ((alg_id, split_k, split_k_mode), which API ran)."""
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is not None:
        r = mm_search(packed, x2.t(), bias, None, None, True)
        return (int(r[0]), int(r[1]), int(r[2])), "torch._C._cusparselt.mm_search"
    alg = torch._cslt_sparse_mm_search(packed, x2.t(), bias=bias, transpose_result=True)
    return (int(alg), 1, -1), "torch._cslt_sparse_mm_search"


_OP_NAME = "llmprune::sparse24_linear"


def _ensure_op():
    """Register the kernel as a custom op (with a fake implementation) for torch.compile; once per process."""
    if hasattr(torch.ops, "llmprune") and hasattr(torch.ops.llmprune, "sparse24_linear"):
        return torch.ops.llmprune.sparse24_linear
    from torch.library import custom_op

    schema = ("(Tensor x, Tensor packed, Tensor? meta, Tensor? bias, int out_features, str backend, int alg_id, "
              "int split_k, int split_k_mode, int pad_to) -> Tensor")

    @custom_op(_OP_NAME, mutates_args=(), schema=schema)
    def op(x, packed, meta, bias, out_features, backend, alg_id, split_k, split_k_mode, pad_to):
        return sparse_mm_2d(x, packed, meta, bias, out_features, backend, (alg_id, split_k, split_k_mode), pad_to)

    @op.register_fake
    def _(x, packed, meta, bias, out_features, backend, alg_id, split_k, split_k_mode, pad_to):
        return x.new_empty((x.shape[0], out_features))

    return torch.ops.llmprune.sparse24_linear


# ---------------------------------------------------------------- the module

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


# ---------------------------------------------------------------- measurement (CUDA)

def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20, repeats: int = 5,
                 graph: bool = False) -> float:
    """Median over `repeats` of the mean time per call of `iters` back-to-back calls (CUDA events).

    graph=True: the `iters` calls are captured once in a CUDA graph and replayed, so host time is excluded."""
    stream = torch.cuda.current_stream()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        stream.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        run = g.replay
        run()
    else:
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(iters):
                fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    if graph:
        del g
    return statistics.median(times)


def _weight_copies(weight: torch.Tensor, max_copies: int = 16) -> int:
    """How many copies of a weight to cycle through so the timed working set is >= 4x the L2 cache (a decode step
    streams every layer's weight from memory; one weight reused back to back would stay in L2)."""
    try:
        l2 = int(torch.cuda.get_device_properties(weight.device).L2_cache_size)
    except Exception:  # noqa: BLE001
        l2 = 50 * 2**20
    nbytes = weight.numel() * weight.element_size()
    return max(2, min(max_copies, math.ceil(4 * l2 / max(nbytes, 1))))


def _cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@torch.no_grad()
def measure_shape(weight: torch.Tensor, bias: torch.Tensor | None, token_counts, backends, *,
                  modes=TIMING_MODES, warmup: int = 3, iters: int = 20, repeats: int = 5, search: bool = True,
                  verify_tol: float = 2e-2) -> dict:
    """Dense `F.linear` against each backend's sparse kernel for one 2:4 weight at each token count.

    Each timed loop cycles through `weight_copies` copies of the weight (working set >= 4x L2), as a model does.
    Returns {"dense_ms": {mode: [...]}, "sparse_ms": {backend: {mode: [...]}}, "plans": {backend: {padded M:
    plan}}, "search_api", "errors": {backend: [...]}, "rel_err": {backend: x}, "weight_copies"}; a failed point
    is None."""
    dev, dtype = weight.device, weight.dtype
    out_f, in_f = weight.shape
    counts = list(token_counts)
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = {m: torch.randn(m, in_f, device=dev, dtype=dtype, generator=gen) for m in counts}
    n_copies = _weight_copies(weight)
    weights = [weight] + [weight.clone() for _ in range(n_copies - 1)]
    res = {"dense_ms": {}, "sparse_ms": {}, "plans": {}, "search_api": None, "errors": {}, "rel_err": {},
           "weight_copies": n_copies}
    for mode in modes:
        row = []
        for m in counts:
            try:
                fn = _cycle([lambda x=xs[m], w=w: F.linear(x, w, bias) for w in weights])
                row.append(cuda_time_ms(fn, warmup=warmup, iters=iters, repeats=repeats, graph=mode == "graph"))
            except Exception as e:  # noqa: BLE001 - recorded, the mode is then left out of the decision
                res["errors"].setdefault("dense", []).append(f"{mode} M={m}: {_err(e)}")
                row.append(None)
        res["dense_ms"][mode] = row
    for backend in backends:
        errs = res["errors"].setdefault(backend, [])
        res["sparse_ms"][backend] = {mode: [None] * len(counts) for mode in modes}
        plans = res["plans"].setdefault(backend, {})
        try:
            packs = [compress_2of4(w, backend) for w in weights]
            packed, meta = packs[0]
            pad_to = _constraints(backend, dtype)[2]
            x = xs[counts[0]]
            ref = F.linear(x, weight, bias)
            y = sparse_mm_2d(x, packed, meta, bias, out_f, backend, DEFAULT_PLAN, pad_to)
            res["rel_err"][backend] = _rel_err(y, ref)
            if not res["rel_err"][backend] <= verify_tol:
                raise RuntimeError(f"relative error {res['rel_err'][backend]:.2e} > {verify_tol:g} against dense")
        except Exception as e:  # noqa: BLE001 - this backend is out for this shape
            errs.append(f"setup: {_err(e)}")
            continue
        for i, m in enumerate(counts):
            x = xs[m]
            m_pad = padded_tokens(m, pad_to)
            plan = DEFAULT_PLAN

            def call(p, all_copies=True):
                return _cycle([lambda pk=pk, mt=mt: sparse_mm_2d(x, pk, mt, bias, out_f, backend, p, pad_to)
                               for pk, mt in (packs if all_copies else packs[:1])])
            # Plans are compared by kernel time (graph replay) where graphs are measured: an eager call's
            # ~0.4 ms of host-side set-up would drown the difference between algorithms.
            by_graph = "graph" in modes
            candidates = [DEFAULT_PLAN]
            if backend == "cusparselt" and search:
                try:
                    xp = F.pad(x, (0, 0, 0, m_pad - m)) if m_pad != m else x
                    found, res["search_api"] = cslt_search(packed, xp, bias)
                    candidates.append(found)
                except Exception as e:  # noqa: BLE001 - keep the default plan
                    errs.append(f"search M={m}: {_err(e)}")
                candidates += list(plans.values())  # what the search found at the other token counts
            best_t, graph_t = None, None
            for cand in dict.fromkeys(tuple(c) for c in candidates):  # unique, in order
                try:
                    if cand != DEFAULT_PLAN:
                        y = call(cand, all_copies=False)()
                        if _rel_err(y, F.linear(x, weight, bias)) > verify_tol:
                            raise RuntimeError(f"plan {cand} gives wrong results")
                    t = cuda_time_ms(call(cand), warmup=warmup, iters=iters, repeats=repeats, graph=by_graph)
                except Exception as e:  # noqa: BLE001
                    errs.append(f"{'graph' if by_graph else 'eager'} M={m} plan {cand}: {_err(e)}")
                    continue
                if best_t is None or t < best_t:
                    best_t, plan = t, cand
            if best_t is None:
                continue
            if plan != DEFAULT_PLAN:
                plans[m_pad] = plan
            if by_graph:
                res["sparse_ms"][backend]["graph"][i] = best_t
            if "eager" in modes:
                try:
                    res["sparse_ms"][backend]["eager"][i] = cuda_time_ms(call(plan), warmup=warmup, iters=iters,
                                                                       repeats=repeats, graph=False)
                except Exception as e:  # noqa: BLE001
                    errs.append(f"eager M={m}: {_err(e)}")
        del packs, packed, meta
    del weights
    for k in [k for k, v in res["errors"].items() if not v]:
        del res["errors"][k]
    return res


# ---------------------------------------------------------------- the in-place verb

def scan_layers(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The blocks' linear layers split into eligible ones (2:4, fp16/bf16, nn.Linear) and skipped ones with the
    reason, by dotted name from the model root."""
    blocks = find_blocks(model)
    eligible, skipped = {}, {}
    for i, block in enumerate(blocks.modules):
        for name, layer in block.named_modules():
            if isinstance(layer, Sparse24Linear):
                skipped[f"{blocks.path}.{i}.{name}"] = "already a Sparse24Linear"
        for name, layer in linear_layers(block).items():
            full = f"{blocks.path}.{i}.{name}"
            if not isinstance(layer, nn.Linear):
                skipped[full] = f"{type(layer).__name__} is not an nn.Linear"
            elif layer.weight.dtype not in SUPPORTED_DTYPES:
                skipped[full] = (f"dtype {str(layer.weight.dtype).removeprefix('torch.')} has no 2:4 kernel "
                                 "(convert the model to bfloat16 or float16)")
            elif not is_2of4(layer.weight.data):
                skipped[full] = "not 2:4"
            else:
                eligible[full] = layer
    return eligible, skipped


def _count(reasons: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


VERIFY_TOKENS = 16  # rows of the random input each converted layer is checked on


def _verify_note(verify: dict, name: str, entry: dict, err: float, y_sparse, y_dense, x, layer) -> None:
    """Fold one layer's check into the report's "verify" section and its shape entry (max over layers)."""
    def bump(d, key, v):
        if v is not None and (d.get(key) is None or v > d[key]):
            d[key] = v
            return True
        return False
    verify["layers"] += 1
    if bump(verify, "max_rel_err_sparse_vs_dense", err):
        verify["max_layer"] = name
    bump(entry, "verify_max_rel_err", err)
    try:  # the bf16 floor: both results against a float32 product of the same (bf16-valued) weight and input
        ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        bump(verify, "max_rel_err_sparse_vs_fp32", _rel_err(y_sparse, ref))
        bump(verify, "max_rel_err_dense_vs_fp32", _rel_err(y_dense, ref))
        del ref
    except Exception:  # noqa: BLE001 - the floor is informative only
        pass


def _json_thr(thr: Mapping[str, int | None]) -> dict[str, int | None]:
    return {k: (None if v is None or v >= NEVER else int(v)) for k, v in thr.items()}


@torch.no_grad()
def accelerate_2of4_(model: nn.Module, *, device: str | torch.device | None = None,
                     token_counts: Iterable[int] = DEFAULT_TOKEN_COUNTS, policy: str = "dispatch",
                     backends: Iterable[str] = BACKENDS, timing_modes: Iterable[str] = TIMING_MODES,
                     min_speedup: float = 1.03, warmup: int = 3, iters: int = 20, repeats: int = 5,
                     search: bool = True, verify_tol: float = 2e-2, require_all: bool = False) -> dict:
    """Replace, in place, the blocks' 2:4 linear layers by `Sparse24Linear` where the sparse kernel is faster.

    `token_counts`: the M (batch x new tokens) of the workload, e.g. (1, 32, 2048, 16384) for decode at batch 1
    and 32 and 2048-token prefill at batch 1 and 8; thresholds are only as good as the counts measured.
    `policy`: "dispatch" (default; keep a dense copy where sparse loses at small M), "sparse-only" (no dense
    copies: replace only shapes that win at every M), "always" (replace every eligible layer, no timing).
    Returns a JSON-ready report: per shape the timings, decision, backend and plans; layer counts and reasons.
    Falls back (replaces nothing; "status": "fallback" and a "reason") without CUDA or a usable backend."""
    t0 = time.perf_counter()
    counts = _validate(policy, token_counts, min_speedup)
    backends = (backends,) if isinstance(backends, str) else tuple(backends)
    timing_modes = (timing_modes,) if isinstance(timing_modes, str) else tuple(timing_modes)
    modes = [m for m in TIMING_MODES if m in set(timing_modes)]
    if not modes:
        raise LLMPruneError(f"timing_modes must include one of {', '.join(TIMING_MODES)}, got {timing_modes!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise LLMPruneError(f"unknown 2:4 backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
    eligible, skipped = scan_layers(model)
    if require_all and skipped:
        name, why = next(iter(skipped.items()))
        raise LLMPruneError(f"{len(skipped)} block linear layer(s) cannot be accelerated, e.g. {name}: {why}")
    report = {"status": "fallback", "reason": None, "policy": policy, "token_counts": list(counts),
              "timing_modes": modes, "min_speedup": min_speedup, "torch": torch.__version__,
              "cuda": torch.version.cuda, "device": None, "cusparselt_version": None, "cslt_api": cslt_api(),
              "search_api": None, "backends_available": [], "backends_unavailable": {}, "shapes": [],
              "layers": {"total": len(eligible) + len(skipped), "eligible": len(eligible), "replaced": 0,
                         "dispatching": 0, "sparse_only": 0, "kept_dense": len(eligible) + len(skipped),
                         "kept_dense_reasons": _count(skipped.values())},
              "layer_decisions": {**{n: f"dense: {r}" for n, r in skipped.items()}},
              "memory": {"compressed_bytes": 0, "dense_copy_bytes": 0, "dense_bytes_freed": 0}, "verify": None,
              "seconds": None}

    def fallback(reason: str) -> dict:
        log.warning("2:4 acceleration: nothing replaced: %s", reason)
        report["reason"] = reason
        for n in eligible:
            report["layer_decisions"][n] = f"dense: {reason}"
        report["layers"]["kept_dense_reasons"] = _count(r.removeprefix("dense: ")
                                                        for r in report["layer_decisions"].values())
        report["seconds"] = time.perf_counter() - t0
        return report

    if not eligible:
        why = "; ".join(f"{k} ({v})" for k, v in _count(skipped.values()).items()) or "no linear layers"
        return fallback(f"no eligible 2:4 linear layer in the blocks: {why}")
    if not torch.cuda.is_available():
        return fallback("CUDA is not available")
    devices = {layer.weight.device for layer in eligible.values()}
    if device is not None:
        want = torch.device(device)
        if any(d.type != want.type or (want.index is not None and d.index != want.index) for d in devices):
            raise LLMPruneError(f"the model's layers are on {sorted(map(str, devices))}, not {want}; move the model "
                                f"there first (model.to({str(want)!r}))")
    if len(devices) > 1:
        raise LLMPruneError(f"the block layers are spread over {sorted(map(str, devices))}; put the model on one GPU")
    dev = next(iter(devices))
    report["device"] = str(dev)
    if dev.type != "cuda":
        return fallback(f"the model is on {dev}; move it to a CUDA device first (model.cuda())")
    report["device"] = f"{dev} ({torch.cuda.get_device_name(dev)})"
    ok, why_not = available_backends(dev)
    ok = [b for b in ok if b in set(backends)]
    report["backends_available"], report["backends_unavailable"] = ok, why_not
    if getattr(torch.backends, "cusparselt", None) is not None and "cusparselt" in ok:
        try:
            report["cusparselt_version"] = torch.backends.cusparselt.version()
        except Exception:  # noqa: BLE001
            pass
    if not ok:
        return fallback("no semi-structured sparse backend: " + "; ".join(f"{k}: {v}" for k, v in why_not.items()))

    groups = group_by_shape(eligible)
    replacements: dict[str, Sparse24Linear] = {}
    verify = report["verify"] = {"tol": verify_tol, "tokens": VERIFY_TOKENS, "layers": 0,
                                 "max_rel_err_sparse_vs_dense": None, "max_layer": None,
                                 "max_rel_err_sparse_vs_fp32": None, "max_rel_err_dense_vs_fp32": None,
                                 "note": "one random input per layer; sparse vs dense bf16 F.linear, and both against "
                                         "a float32 product of the same weight (the bf16 rounding floor)"}
    for (out_f, in_f, dt), names in groups.items():
        first = eligible[names[0]]
        fits = {b: shape_fits(b, out_f, in_f, first.weight.dtype) for b in ok}
        usable = [b for b in ok if fits[b] is None]
        entry = {"shape": [out_f, in_f], "dtype": dt, "layers": len(names), "token_counts": list(counts),
                 "backends_tried": usable, "backends_refused": {b: r for b, r in fits.items() if r}}
        report["shapes"].append(entry)
        if not usable:
            reason = "; ".join(f"{b}: {r}" for b, r in fits.items())
            entry.update(decision="dense", reason=reason)
            for n in names:
                report["layer_decisions"][n] = f"dense: {reason}"
            continue
        if policy == "always":
            dec = {"decision": "sparse", "backend": usable[0], "dense_below": {m: 0 for m in modes},
                   "keep_dense": False, "reason": None}
            plans = {}
        else:
            log.info("2:4 shape (%d, %d) %s x %d layers: timing dense vs %s at M=%s", out_f, in_f, dt, len(names),
                     "/".join(usable), list(counts))
            meas = measure_shape(first.weight.data, first.bias.data if first.bias is not None else None, counts,
                                 usable, modes=modes, warmup=warmup, iters=iters, repeats=repeats, search=search,
                                 verify_tol=verify_tol)
            report["search_api"] = report["search_api"] or meas["search_api"]
            dec = decide(counts, meas["dense_ms"], meas["sparse_ms"], policy=policy, min_speedup=min_speedup)
            plans = meas["plans"].get(dec["backend"], {}) if dec["backend"] else {}
            entry.update(dense_ms=meas["dense_ms"], sparse_ms=meas["sparse_ms"], errors=meas["errors"],
                         rel_err=meas["rel_err"], weight_copies=meas["weight_copies"],
                         plans={b: {str(k): list(v) for k, v in p.items()} for b, p in meas["plans"].items()})
        entry.update(decision=dec["decision"], backend=dec["backend"], dense_below=_json_thr(dec["dense_below"]),
                     keep_dense=dec["keep_dense"], reason=dec["reason"])
        log.info("2:4 shape (%d, %d): %s%s", out_f, in_f, dec["decision"],
                 f" via {dec['backend']}, dense below {_json_thr(dec['dense_below'])}" if dec["backend"] else
                 f" ({dec['reason']})")
        if dec["decision"] == "dense":
            for n in names:
                report["layer_decisions"][n] = f"dense: {dec['reason']}"
            continue
        for n in names:
            layer = eligible[n]
            try:
                new = Sparse24Linear.from_linear(layer, dec["backend"], keep_dense=dec["keep_dense"],
                                                 dense_below=dec["dense_below"], plans=plans)
                x = torch.randn(VERIFY_TOKENS, in_f, device=dev, dtype=layer.weight.dtype,
                                generator=torch.Generator(device=dev).manual_seed(1))
                new.set_mode("sparse")
                y_sparse = new(x)
                new.set_mode("eager")
                y_dense = F.linear(x, layer.weight, layer.bias)
                err = _rel_err(y_sparse, y_dense)
                if not err <= verify_tol:
                    raise RuntimeError(f"relative error {err:.2e} > {verify_tol:g} against dense")
                _verify_note(verify, n, entry, err, y_sparse, y_dense, x, layer)
            except Exception as e:  # noqa: BLE001 - this layer stays dense
                report["layer_decisions"][n] = f"dense: conversion failed: {_err(e)}"
                continue
            replacements[n] = new
            report["layer_decisions"][n] = "dispatch" if dec["keep_dense"] else "sparse"

    mem = report["memory"]
    for name, new in replacements.items():
        parent_name, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent_name), attr, new)
        nbytes = old.weight.numel() * old.weight.element_size()
        mem["compressed_bytes"] += new.packed.numel() * new.packed.element_size() + (
            new.meta.numel() * new.meta.element_size() if new.meta is not None else 0)
        if new.weight is not None:
            mem["dense_copy_bytes"] += nbytes
        else:
            mem["dense_bytes_freed"] += nbytes
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    decisions = report["layer_decisions"].values()
    L = report["layers"]
    L["replaced"] = len(replacements)
    L["dispatching"] = sum(d == "dispatch" for d in decisions)
    L["sparse_only"] = sum(d == "sparse" for d in decisions)
    L["kept_dense"] = L["total"] - L["replaced"]
    L["kept_dense_reasons"] = _count(d.removeprefix("dense: ") for d in decisions if d.startswith("dense: "))
    report["status"] = "converted" if replacements else "fallback"
    if not replacements:
        report["reason"] = "no layer was faster sparse (see shapes)"
    report["seconds"] = time.perf_counter() - t0
    log.info("2:4 acceleration: %d of %d block linear layers replaced (%d dispatching with a dense copy) in %.1f s",
             L["replaced"], L["total"], L["dispatching"], report["seconds"])
    return report


__all__ = ["accelerate_2of4_", "Sparse24Linear", "set_sparse24_mode", "sparse24_mode", "restore_dense_",
           "sparse24_layers", "scan_layers", "measure_shape", "cuda_time_ms", "decide", "dense_threshold",
           "group_by_shape",
           "shape_key", "is_2of4", "padded_tokens", "shape_fits", "available_backends", "compress_2of4",
           "sparse_mm_2d", "cslt_api", "cslt_search", "BACKENDS", "POLICIES", "RUN_MODES", "DEFAULT_TOKEN_COUNTS"]
