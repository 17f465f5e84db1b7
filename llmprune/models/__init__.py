"""Models: loading (`load`: Hub id, folder, GGUF, the embedded default; device and dtype), architecture discovery
(`arch`: blocks, linear layers, (out, in) weight views) and saving (`save`: save dtype, size estimates, atomic
folder). The names are re-exported here for users; inside the package, import from the module itself, so that the
low rooms that need only `arch` never load `load` or `save`."""

from .arch import Blocks, find_blocks, in_features, linear_layers, weight_oi
from .load import (DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, DTYPES, LoadedModel, check_context, context_length,
                   default_model_path, dtype_label, load_model, resolve_device, resolve_dtype)
from .save import (GGUF_SCAN_MIN_BYTES, SAVE_DTYPES, apply_default_permissions, bytes_per_param, cast_for_save_,
                   checkpoint_bytes, checkpoint_params, current_umask, model_bytes,
                   resolve_save_dtype, safetensors_summary, save_pretrained_atomic)

__all__ = ["Blocks", "find_blocks", "in_features", "linear_layers", "weight_oi", "DEFAULT_GGUF_FILE",
           "DEFAULT_GGUF_PACKAGE", "DTYPES", "LoadedModel", "check_context", "context_length", "default_model_path",
           "dtype_label", "load_model", "resolve_device", "resolve_dtype", "GGUF_SCAN_MIN_BYTES", "SAVE_DTYPES",
           "apply_default_permissions", "bytes_per_param", "cast_for_save_", "checkpoint_bytes", "checkpoint_params",
           "current_umask", "model_bytes", "resolve_save_dtype", "safetensors_summary", "save_pretrained_atomic"]
