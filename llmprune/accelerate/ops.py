"""The 2:4 kernels, called at the kernel level: the pattern check, compression, the padded sparse matmul on either
backend, cuSPARSELt's algorithm search, and the custom op that torch.compile sees.

* Kernel-level API, not the tensor subclass. `torch.sparse.to_sparse_semi_structured` wraps the weight in a
  tensor subclass whose `F.linear` goes through `__torch_dispatch__` and a padding custom op, and every
  `_cslt_sparse_mm` call builds and destroys its cuSPARSELt descriptors and plan (pytorch issue 153825 measured
  ~0.46 ms of host time per call): many times slower than dense below ~2048 tokens when run eagerly. We call
  the kernels directly: `torch._cslt_compress` once per layer, then `torch._cslt_sparse_mm(W_c, x^T,
  bias, transpose_result=True, alg_id=..)` (cuSPARSELt computes sparse(A) @ dense(B), so y = x W^T is
  (W_c @ x^T)^T; `transpose_result` writes it directly as a row-major (tokens, out) tensor and a transposed
  view of x is accepted without a copy), or CUTLASS's `torch._sparse_semi_structured_linear` (fallback:
  `_sparse_semi_structured_mm`). The per-call host cost that remains is removed by CUDA graphs.
* The algorithm search uses `torch._C._cusparselt.mm_search` (alg_id, split_k, split-k mode) where present,
  else the older, deprecated `torch._cslt_sparse_mm_search` (alg_id only); the keywords a plan is passed with
  follow `backends.cslt_api()`.
* Padding: the dense operand's token dimension is padded with zero rows to the backend's minimum (8 rows for
  16-bit dtypes), so a decode step with 1 token computes 8 rows and returns the first.
* Under `torch.compile` the kernel is a custom op with a fake (meta) implementation, because aten's meta function
  for `_cslt_sparse_mm` takes the 1-D compressed weight's length for its row count.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ..masks import check_nm
from .backends import cslt_api

DEFAULT_PLAN = (0, 1, -1)  # cuSPARSELt (alg_id, split_k, split_k_mode): the library's default algorithm

warnings.filterwarnings("ignore", message=".*_sparse_semi_structured_linear is deprecated.*")
warnings.filterwarnings("ignore", message=".*torch._cslt_sparse_mm_search is deprecated.*")
warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype stage.*")


def is_2of4(weight: torch.Tensor) -> bool:
    """True if every 4 consecutive weights along the input dimension of every row hold at most 2 non-zeros."""
    return weight.dim() == 2 and check_nm(weight, 2, 4)


def padded_tokens(m: int, multiple: int) -> int:
    """The token count rounded up to the backend's multiple (the dense operand's minimum)."""
    return -(-m // multiple) * multiple


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
