"""A cache of converted GGUF files: the dequantized model (safetensors) and the converted tokenizer, keyed by the
file's sha256, so that a GGUF is dequantized and its tokenizer converted once, not on every run.

An entry is a folder `<root>/gguf/<sha256>-transformers-<version>-v<format>/`. It is written into a temporary
sibling and renamed into place, and its manifest (`MANIFEST`) is written last: a folder without a valid manifest
is incomplete, ignored and rebuilt. The weights are stored losslessly: each tensor in the GGUF's own half precision
when that holds every dequantized value exactly, else in float32 (block-quantized values, a scale times a small
integer, generally need float32), so that a reload at any dtype equals a fresh conversion at that dtype."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from .progress import progress

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "llmprune-gguf-cache.json"
STALE_SECONDS = 24 * 3600  # temporary folders of runs killed while writing are removed after this
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str | None) -> torch.dtype | None:
    return {v: k for k, v in _NAMES.items()}.get(name) if name else None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $LLMPRUNE_CACHE, else `llmprune/` in the Hugging Face home ($HF_HOME, ~/.cache/huggingface)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("LLMPRUNE_CACHE"):
        return Path(os.environ["LLMPRUNE_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "llmprune"


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """The sha256 of a file, read in chunks behind a progress bar (bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, progress(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=f"sha256 {path.name}", leave=False) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def entry_dir(root: str | os.PathLike, sha256: str) -> Path:
    """The entry of a GGUF file: its hash, the transformers version that converted it, the cache format."""
    import transformers

    return Path(root) / "gguf" / f"{sha256}-transformers-{transformers.__version__}-v{CACHE_FORMAT}"


def read_entry(entry: Path, sha256: str) -> dict | None:
    """The manifest of a complete entry for the file `sha256`, or None (missing, incomplete or not this file's)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        if entry.exists():
            log.info("ignoring the incomplete GGUF cache entry %s (no %s); it is rebuilt", entry, MANIFEST)
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable GGUF cache entry %s (%s); it is rebuilt", entry, e)
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("sha256") != sha256:
        log.warning("ignoring the GGUF cache entry %s: it was written for another file or format", entry)
        return None
    if not all((entry / name).is_file() for name in manifest.get("files", [])):
        log.warning("ignoring the GGUF cache entry %s: files are missing; it is rebuilt", entry)
        return None
    return manifest


def gguf_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The float type a GGUF file's weights are stored in (F16 -> float16, BF16 -> bfloat16, all F32 -> float32),
    or None when it holds quantized blocks. Its F32 tensors beside half ones are the norms, so half wins."""
    try:  # transformers' own header reader: the tensor table only (fast)
        from transformers.integrations.gguf.reader import GgufHeader

        types = set(GgufHeader.from_file(str(path)).ggml_types.values())
    except ImportError:  # older transformers: the gguf package parses every field, tokenizer included (slower)
        from gguf import GGUFReader

        types = {int(t.tensor_type) for t in GGUFReader(str(path)).tensors}
    from gguf import GGMLQuantizationType as Q

    floats = {int(Q.F32): torch.float32, int(Q.F16): torch.float16, int(Q.BF16): torch.bfloat16}
    if not types <= set(floats):
        return None
    for t in (Q.BF16, Q.F16, Q.F32):
        if int(t) in types:
            return floats[int(t)]
    return None


def check_gguf_file(path: str | os.PathLike) -> None:
    """Refuse a GGUF file whose header can't be read or whose tensor data ends before the file does (an
    interrupted download or copy), naming the file: one LLMPruneError line instead of a reshape error deep in the
    conversion. Reads the header and tensor table only (milliseconds)."""
    from .errors import LLMPruneError

    path = Path(path)
    size = path.stat().st_size
    try:
        try:
            from transformers.integrations.gguf.reader import GgufHeader
        except ImportError:  # older transformers: the gguf package maps the tensors and fails on a short file
            from gguf import GGUFReader

            GGUFReader(str(path))
            return
        header = GgufHeader.from_file(str(path))
        need = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - struct/index/value errors of a short or damaged header
        if "magic" in str(e):
            raise LLMPruneError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes") from None
        short = "buffer" in str(e) or "out of bounds" in str(e)  # the header runs past the end of the file
        raise LLMPruneError(f"the GGUF file {path} is {'truncated' if short else 'truncated or corrupt'}: its header "
                            f"cannot be read ({size:,} bytes); download or copy it again") from None
    if size < need:
        raise LLMPruneError(f"the GGUF file {path} is truncated: its tensors need {need:,} bytes, the file has "
                            f"{size:,}; download or copy it again")


def lossless_state_dict(model: torch.nn.Module, half: torch.dtype) -> tuple[dict, dict[str, int]]:
    """The model's state dict with each float tensor in `half` where that holds every value exactly, else as is;
    tied tensors stay one tensor. Returns it and the count of tensors per stored dtype."""
    out, memo, counts = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in memo:
            stored = t
            if t.is_floating_point() and t.dtype != half:
                h = t.to(half)
                if torch.equal(h.to(t.dtype), t) and torch.equal(torch.signbit(h), torch.signbit(t)):
                    stored = h
            memo[key] = stored
            counts[dtype_name(stored.dtype)] = counts.get(dtype_name(stored.dtype), 0) + 1
        out[name] = memo[key]
    return out, counts


def write_entry(entry: Path, model: torch.nn.Module, tokenizer, manifest: dict, half: torch.dtype | None,
                replace: bool = False) -> bool:
    """Write a converted model and tokenizer as the entry `entry`, atomically; True if the entry is there after.

    `half`: the dtype tried per tensor (see `lossless_state_dict`); None stores the model as it is. An existing
    complete entry (another run wrote it meanwhile) is kept unless `replace` (it failed to load). A failure to write
    (no space, no permission) is logged and leaves no partial entry: the run goes on without the cache."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(entry)
    params = {id(p): p for p in model.parameters()}.values()
    need = sum(p.numel() * p.element_size() for p in params)
    free = shutil.disk_usage(entry.parent).free
    if need * 1.1 > free:
        log.warning("not caching the converted GGUF: it needs about %.1f GB and %s has %.1f GB free",
                    need / 1e9, entry.parent, free / 1e9)
        return False
    tmp = entry.parent / f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}"
    t = time.perf_counter()
    log.info("writing the converted GGUF to the cache %s (about %.1f MB)...", entry, need / 1e6)
    try:
        state_dict, counts = lossless_state_dict(model, half) if half is not None else (None, None)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        del state_dict
        tokenizer.save_pretrained(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {**manifest, "format": CACHE_FORMAT, "files": files, "stored_dtypes": counts,
                    "bytes": sum((tmp / f).stat().st_size for f in files),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: the entry is complete
        if entry.exists():
            if not replace and read_entry(entry, manifest["sha256"]) is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # another run finished the same entry first
                return True
            old = entry.parent / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, entry)
    except Exception as e:  # noqa: BLE001 - the cache only saves time: a run never fails on it
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not write the GGUF cache entry %s (%s: %s); going on without it", entry,
                    type(e).__name__, e)
        return entry.exists() and read_entry(entry, manifest["sha256"]) is not None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stored = ", ".join(f"{n} tensors in {d}" for d, n in (counts or {}).items())
    log.info("cached in %.1f s: %.1f MB%s", time.perf_counter() - t, manifest["bytes"] / 1e6,
             f" ({stored})" if stored else "")
    return True


def _remove_stale(entry: Path) -> None:
    """Temporary folders of this entry left by runs that were killed while writing, a day old or more."""
    now = time.time()
    for p in entry.parent.glob(f".{entry.name}.*-*"):
        try:
            if now - p.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
