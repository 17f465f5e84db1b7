"""2:4 acceleration: run a 2:4-pruned model's linear layers on the GPU's semi-structured sparse tensor cores.

Sparse Tensor Cores (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378) multiply
a matrix holding at most 2 non-zeros in every 4 consecutive weights (stored compressed: the kept values plus 2-bit
indices, 9/16 of the dense bytes in 16-bit) by a dense matrix at up to twice the dense rate. This package is the
separate, optional acceleration step of STYLE.md principle 7: pruning writes exact zeros; `accelerate_2of4_`
turns the blocks' 2:4 `nn.Linear` layers of a model already on a CUDA device into `Sparse24Linear` in memory.

This is a runtime (in-memory) conversion for inference only: the saved format stays the dense safetensors
model with exact zeros (`restore_dense_` converts back before saving). Without CUDA, without a semi-structured
backend, or with no eligible layer, nothing is replaced and the report says why.

The modules, each importing only those above it (no cycles):

    backends.py   which backends exist and work here (cuSPARSELt, CUTLASS), their shape/dtype constraints
    ops.py        the kernels: 2:4 check, compression, the padded sparse matmul, plan search, the custom op
    layer.py      Sparse24Linear (dense dispatch below a token count), run modes, restore_dense_
    timing.py     the timing harness: CUDA-event kernel times, eager and CUDA-graph, plans per token count
    policy.py     the decision from measured times: backend, dense thresholds, policies
    convert.py    accelerate_2of4_: scan the blocks, time, decide, replace, verify, report
"""

from .backends import BACKENDS, SUPPORTED_DTYPES, available_backends, cslt_api, shape_fits
from .convert import DEFAULT_TOKEN_COUNTS, accelerate_2of4_, group_by_shape, scan_layers, shape_key
from .layer import (RUN_MODES, TIMING_MODES, Sparse24Linear, restore_dense_, set_sparse24_mode, sparse24_layers,
                    sparse24_mode)
from .ops import DEFAULT_PLAN, compress_2of4, cslt_search, is_2of4, padded_tokens, sparse_mm_2d
from .policy import POLICIES, decide, dense_threshold
from .timing import cuda_time_ms, measure_shape

__all__ = ["accelerate_2of4_", "Sparse24Linear", "set_sparse24_mode", "sparse24_mode", "restore_dense_",
           "sparse24_layers", "scan_layers", "measure_shape", "cuda_time_ms", "decide", "dense_threshold",
           "group_by_shape", "shape_key", "is_2of4", "padded_tokens", "shape_fits", "available_backends",
           "compress_2of4", "sparse_mm_2d", "cslt_api", "cslt_search", "BACKENDS", "POLICIES", "RUN_MODES",
           "TIMING_MODES", "SUPPORTED_DTYPES", "DEFAULT_TOKEN_COUNTS", "DEFAULT_PLAN"]
