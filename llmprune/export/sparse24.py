"""Deprecated: 2:4 acceleration moved to `llmprune.accelerate` (e.g. `from llmprune.accelerate import
accelerate_2of4_, restore_dense_`).

This module only re-exports the public names of `llmprune.accelerate` (the same objects) for one release, and
warns on import; it will then be removed. Patch or extend the modules under `llmprune.accelerate`, not these
names: rebinding a name here changes nothing there.
"""

import warnings

from ..accelerate import (BACKENDS, DEFAULT_PLAN, DEFAULT_TOKEN_COUNTS, POLICIES, RUN_MODES, SUPPORTED_DTYPES,
                          TIMING_MODES, Sparse24Linear, accelerate_2of4_, available_backends, compress_2of4,
                          cslt_api, cslt_search, cuda_time_ms, decide, dense_threshold, group_by_shape, is_2of4,
                          measure_shape, padded_tokens, restore_dense_, scan_layers, set_sparse24_mode, shape_fits,
                          shape_key, sparse24_layers, sparse24_mode, sparse_mm_2d)
from ..accelerate.convert import VERIFY_TOKENS
from ..accelerate.layer import NEVER

warnings.warn("llmprune.export.sparse24 is deprecated; import from llmprune.accelerate instead",
              DeprecationWarning, stacklevel=2)

__all__ = ["accelerate_2of4_", "Sparse24Linear", "set_sparse24_mode", "sparse24_mode", "restore_dense_",
           "sparse24_layers", "scan_layers", "measure_shape", "cuda_time_ms", "decide", "dense_threshold",
           "group_by_shape", "shape_key", "is_2of4", "padded_tokens", "shape_fits", "available_backends",
           "compress_2of4", "sparse_mm_2d", "cslt_api", "cslt_search", "BACKENDS", "POLICIES", "RUN_MODES",
           "TIMING_MODES", "SUPPORTED_DTYPES", "DEFAULT_TOKEN_COUNTS", "DEFAULT_PLAN", "NEVER", "VERIFY_TOKENS"]
