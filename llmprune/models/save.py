"""Save a pruned model: the dtype it is saved in (`resolve_save_dtype`, `cast_for_save_` keeping zeros exact), size
estimates before loading and of a saved folder (`checkpoint_bytes`, `model_bytes`, `safetensors_summary`), the
modes new files get under the umask, and the atomic write of the whole folder (`save_pretrained_atomic`)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import outputs
from ..errors import LLMPruneError
from .load import DTYPES, LoadedModel, default_model_path, dtype_label

log = logging.getLogger(__name__)


def bytes_per_param(dtype: torch.dtype | str | None) -> int:
    """Bytes of one saved weight at `dtype`; "auto" (an accelerator's half precision) counts 2."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return 2 if dtype == "auto" else 4


def model_bytes(model: nn.Module, dtype: torch.dtype | str | None = None) -> int:
    """Bytes the weights of `model` take in safetensors at `dtype` (default: each tensor's own); tied tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (t.element_size() if dtype is None else bytes_per_param(dtype))
    return total


GGUF_SCAN_MIN_BYTES = 2**30  # below this, reading a GGUF's metadata (seconds: its whole vocabulary) costs more
#                              than loading it; its size is then checked right after loading


def checkpoint_params(spec: str | None, gguf_min_bytes: int = GGUF_SCAN_MIN_BYTES) -> int | None:
    """The number of weights of a local model before loading it: a GGUF's tensor metadata (its dequantized size;
    only for files of `gguf_min_bytes` or more), a folder's safetensors headers; None when it isn't known before
    loading (a Hub id, .bin files, a small GGUF)."""
    try:
        p = default_model_path() if spec is None else Path(spec).expanduser()
    except LLMPruneError:
        return None
    try:
        if p.is_dir():
            ggufs = sorted(p.glob("*.gguf"))
            if not (p / "config.json").exists() and len(ggufs) == 1:
                p = ggufs[0]
        if p.is_file() and p.suffix == ".gguf":
            if p.stat().st_size < gguf_min_bytes:
                return None
            from gguf import GGUFReader

            return sum(int(t.n_elements) for t in GGUFReader(str(p)).tensors)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
        if not files:
            return None
        from safetensors import safe_open

        n = 0
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    n += int(torch.Size(shape).numel())
        return n
    except Exception as e:  # noqa: BLE001 - an estimate only: loading will report a broken file properly
        log.debug("no size estimate for %s: %s", spec, e)
        return None


def checkpoint_bytes(spec: str | None, dtype: torch.dtype | str | None) -> int | None:
    """The saved size at `dtype` of the model `spec` names, known before loading it (see checkpoint_params).
    `auto` (the checkpoint's own precision): a folder's safetensors files as they are, else 2 bytes a weight."""
    if dtype == "auto" and spec is not None and Path(spec).expanduser().is_dir():
        files = sorted(Path(spec).expanduser().glob("*.safetensors"))
        if files and (Path(spec).expanduser() / "config.json").exists():
            return sum(f.stat().st_size for f in files)
    n = checkpoint_params(spec)
    return None if n is None else n * bytes_per_param(dtype)


SAVE_DTYPES = ("auto", *DTYPES)


def resolve_save_dtype(save_dtype: str, loaded: LoadedModel | None, working: torch.dtype) -> torch.dtype:
    """The dtype a pruned model is saved in. `auto`: the checkpoint's own precision (a GGUF: F16 -> float16,
    BF16 -> bfloat16, F32 -> float32, quantized -> bfloat16; a folder or Hub model: its config's dtype), else the
    working dtype."""
    if save_dtype == "auto":
        return (loaded.checkpoint_dtype if loaded is not None else None) or working
    if save_dtype not in DTYPES:
        raise LLMPruneError(f"unknown save dtype {save_dtype!r}; known: {', '.join(SAVE_DTYPES)}")
    return DTYPES[save_dtype]


def cast_for_save_(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the float parameters (and saved buffers) to `dtype` in place, keeping zeros exact: a value that
    rounds to zero (or was -0.0) becomes +0.0, so masks and N:M groups hold (a cast only adds zeros). A value too
    large for `dtype` (float16 overflows past 65504) is refused before anything is changed."""
    tensors = {}
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            tensors.setdefault(id(p), (f"{mod_name}.{name}".lstrip("."), p))
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                tensors.setdefault(id(b), (f"{mod_name}.{name}".lstrip("."), b))
    todo = [(n, t) for n, t in tensors.values() if t.is_floating_point() and t.dtype != dtype]
    if not todo:
        return
    limit = torch.finfo(dtype).max
    for name, t in todo:
        big = float(t.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if t.numel() else 0.0
        if big > limit:
            raise LLMPruneError(f"{name} holds values up to {big:.4g}, more than {dtype_label(dtype)} can hold "
                                f"({limit:.4g}); save with --save-dtype bfloat16 or float32")
    with torch.no_grad():
        for _, t in todo:
            new = t.data.to(dtype)
            new.masked_fill_(new == 0, 0.0)  # -0.0 and underflowed values -> +0.0
            t.data = new


def safetensors_summary(folder: str | os.PathLike) -> dict:
    """What a saved model's weights take on disk: {"bytes": sum of *.safetensors sizes, "dtypes": {dtype: number
    of values}} (read from the files' headers)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    dtypes: dict[str, int] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    sl = sf.get_slice(key)
                    name = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                    dtypes[name] = dtypes.get(name, 0) + math.prod(sl.get_shape())
        except Exception as e:  # noqa: BLE001 - a file that isn't safetensors still has a size
            log.warning("cannot read the header of %s: %s", f, e)
    return {"bytes": sum(f.stat().st_size for f in files), "files": len(files), "dtypes": dtypes}


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def current_umask() -> int:
    """The process umask, read from /proc/self/status on Linux (no change to it); elsewhere set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it
    os.umask(mask)
    return mask


def apply_default_permissions(folder: str | os.PathLike) -> None:
    """Give `folder`, its sub-folders and files the modes a plain `open(path, "w")` / `mkdir` gives under the
    umask (0o666 & ~umask, 0o777 & ~umask): writers that go through a private temporary file (safetensors,
    mkstemp) leave 0o600 behind. Links are left alone."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    root = Path(folder)
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.chmod(path, dir_mode if name in dirnames else file_mode)


def save_pretrained_atomic(model: nn.Module, tokenizer, out_dir: str | os.PathLike, files: dict[str, dict] | None = None,
                           overwrite: bool = False, extra=None, reservation=None) -> Path:
    """Write a safetensors model, its tokenizer, extra JSON `files` and whatever `extra(tmp_folder)` writes into a
    temporary sibling folder, then put it in place (llmprune.outputs.write_output_dir): a failure never leaves a
    half-written `out_dir`; a folder another process put at `out_dir` meanwhile is never replaced (one line, the
    finished model kept beside it); with `overwrite` the old folder is swapped out, never both or neither.
    `reservation`: the lock taken at the start of the run (reserve_output_dir); without one it is taken now.
    The free space is checked against the model's size first; a full disk is one LLMPruneError line. Every
    file and folder gets the modes that the umask gives new files (see `apply_default_permissions`)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
        if extra is not None:
            extra(tmp)
        apply_default_permissions(tmp)  # model.safetensors comes out 0o600

    out = outputs.write_output_dir(out_dir, write, overwrite=overwrite, reservation=reservation,
                                   need=model_bytes(model), what="the model")
    log.info("saved %s", out)
    return out
