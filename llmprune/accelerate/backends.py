"""Which semi-structured (2:4) sparse backends exist and work here: cuSPARSELt and CUTLASS, the weight shapes and
dtypes each takes, and the compute capability each needs.

* Only float16 and bfloat16 are converted (the float32 kernels are TF32 with 1:2 sparsity, which a 2:4 weight
  does not satisfy). Weights must be multiples of (16, 16) for cuSPARSELt and (32, 64) for CUTLASS; the dense
  operand's minimum row count (8 for 16-bit dtypes) is the padding `ops.sparse_mm_2d` applies. All three are read
  from `SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS` where present.
* Which `_cslt_sparse_mm` keywords exist is read from the op's schema, since they changed across releases
  (`alg_id` only; then `split_k` with a bool `split_k_one_kernel`; now `split_k` with an int `split_k_mode`).
* CUTLASS: PyTorch builds its semi-structured CUTLASS kernels for compute capability 8.x only (on 9.0 they raise
  "Supported only on GPUs with compute capability 8.x"), so that backend is reported unavailable elsewhere;
  cuSPARSELt covers 8.x and 9.x.
"""

from __future__ import annotations

import torch

BACKENDS = ("cusparselt", "cutlass")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# (sparse_min_rows, sparse_min_cols, dense_min_rows) per backend for 16-bit dtypes, used where torch has no table
_FALLBACK_CONSTRAINTS = {"cusparselt": (16, 16, 8), "cutlass": (32, 64, 8)}


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
