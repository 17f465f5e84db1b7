"""Calibration windows: token ids of shape (nsamples, seqlen), sampled as the papers do.

Documents (C4, .jsonl, .parquet): draw a random document until one is longer than seqlen, then a random
window inside it (SparseGPT/Wanda's C4 loader). A text stream (WikiText-2, .txt): random windows of the
tokenized stream. Both use a private `random.Random(seed)`, so the windows depend on the seed alone. The BOS
policy (`llmprune.bos`) then puts BOS on every window (in place of its first token) or strips it from each text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bos import AS_GIVEN_PLAN, BosPlan, resolve_bos
from ..config import CalibrationConfig
from ..errors import LLMPruneError

log = logging.getLogger(__name__)

NAMED_SOURCES = ("c4", "wikitext2")
TOKEN_SUFFIXES = (".pt", ".safetensors", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"


@dataclass
class CalibrationData:
    """Calibration token ids and where they came from."""

    tokens: torch.Tensor  # (nsamples, seqlen) int64
    source: str
    description: str = ""
    bos: BosPlan | None = None  # how BOS was placed in the windows (None: not recorded)

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LLMPruneError(f"calibration tokens must have shape (nsamples, seqlen) with nsamples >= 1 and "
                                f"seqlen >= 2, got {shape} ({self.source})")

    @property
    def sha256(self) -> str:
        return token_hash(self.tokens)

    @property
    def nsamples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.tokens.shape[1])

    def to_dict(self) -> dict:
        return {"source": self.source, "description": self.description, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "token_sha256": self.sha256,
                "bos": self.bos.to_dict() if self.bos is not None else None}


def token_hash(tokens: torch.Tensor) -> str:
    """sha256 of the int64 token ids in row-major order (and their shape)."""
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Refuse calibration token ids outside [0, vocab_size): the rows of the model's input embedding."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise LLMPruneError(f"calibration token ids must lie in [0, {vocab_size}) for this model")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """`data_dir` if given, else $LLMPRUNE_DATA_DIR, else None (use the Hugging Face Hub)."""
    d = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(d).expanduser() if d else None


def data_dir_label(data_dir: str | os.PathLike | None) -> str:
    """Where named datasets are read from, for records: the absolute folder `resolve_data_dir` gives, or "hub"."""
    d = resolve_data_dir(data_dir)
    return str(d.resolve()) if d is not None else "hub"


# ---------------------------------------------------------------- text sources

def read_documents(path: Path) -> list[str]:
    """Documents from a .jsonl/.json/.parquet file (field `text`), through `datasets`' local loaders."""
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001
        raise LLMPruneError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "text" not in ds.column_names:
        raise LLMPruneError(f"{path} has no 'text' field (fields: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t]


def named_source_text(name: str, split: str, data_dir: Path | None) -> tuple[list[str] | str, str]:
    """The documents (list) or text stream (str) of a named dataset, and a description of where they came from.

    Hub: C4 en train shard 00000 / validation shard 00000 (the SparseGPT/Wanda files), WikiText-2-raw-v1.
    Local (`data_dir`): `c4/*.parquet|*.jsonl|*.json*`, `wikitext2/wikitext-2-raw-v1.<split>.jsonl`."""
    if name == "c4":
        if data_dir is not None:
            return _local_c4(data_dir / "c4", split)
        shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = _hub_dataset("allenai/c4", None, split, data_files={split: shard})
        return list(ds["text"]), f"hub allenai/c4 {shard}"
    if name == "wikitext2":
        if data_dir is not None:
            f = data_dir / "wikitext2" / f"wikitext-2-raw-v1.{split}.jsonl"
            if not f.is_file():
                hint = (" (only the test split is available locally; calibrating on it would leak the evaluation "
                        "set: use --calib-data c4 or a file)" if split == "train" else "")
                raise LLMPruneError(f"WikiText-2 {split} split not found at {f}{hint}")
            rows = [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
            return rows, f"local WikiText-2-raw-v1 {split} {f}"
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split)
        return list(ds["text"]), f"hub wikitext/wikitext-2-raw-v1 {split}"
    raise LLMPruneError(f"unknown dataset {name!r}; known: {', '.join(NAMED_SOURCES)}")


C4_EVAL_DOCS = 1100  # the papers evaluate C4 perplexity on the first 1100 validation documents


def _local_c4(d: Path, split: str) -> tuple[list[str], str]:
    """Local C4 files by split (`*train*` / `*valid*` in the name). With validation files only, calibration
    ("train") takes the documents after the first 1100, which C4 perplexity evaluates on: the two never overlap."""
    files = sorted(f for f in d.glob("*") if f.suffix in (".parquet", ".jsonl", ".json")) if d.is_dir() else []
    if not files:
        raise LLMPruneError(f"no C4 files (*.parquet, *.jsonl) found in {d}; check --data-dir / ${DATA_DIR_ENV}")
    train = [f for f in files if "train" in f.name]
    valid = [f for f in files if f not in train]
    if split == "train" and train:
        return [t for f in train for t in read_documents(f)], f"local C4 train documents {', '.join(map(str, train))}"
    if not valid:
        raise LLMPruneError(f"no C4 validation file (without 'train' in its name) found in {d}")
    docs = [t for f in valid for t in read_documents(f)]
    where = ", ".join(map(str, valid))
    if split == "train":
        if len(docs) <= C4_EVAL_DOCS:
            raise LLMPruneError(f"local C4 in {d} has no train file and too few validation documents to keep "
                                f"calibration apart from the first {C4_EVAL_DOCS} (evaluation)")
        return docs[C4_EVAL_DOCS:], f"local C4 documents {C4_EVAL_DOCS + 1}-{len(docs)} of {where} (no train file; the first {C4_EVAL_DOCS} are kept for evaluation)"
    return docs, f"local C4 validation documents {where}"


def _hub_dataset(path: str, name: str | None, split: str, **kw):
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, **kw)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LLMPruneError(
            f"cannot load {path} from the Hugging Face Hub ({first}); offline? pass --data-dir with local copies "
            f"(or set ${DATA_DIR_ENV})"
        ) from None


# ---------------------------------------------------------------- sampling

def _encode(tokenizer, text: str, bos: BosPlan | None = None) -> list[int]:
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return bos.text_ids(ids) if bos is not None else ids


def sample_document_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                            allow_overlap: bool = False, bos: BosPlan | None = None) -> torch.Tensor:
    """SparseGPT/Wanda C4 sampling: a random document longer than seqlen, then a random window inside it.

    `bos`: each document's ids pass through `bos.text_ids` and the windows through `bos.windows`."""
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def ids(i: int) -> list[int]:
        if i not in cache:
            cache[i] = _encode(tokenizer, docs[i], bos)
        return cache[i]

    if len(docs) <= 50_000:  # small enough to check up front that the request can be met
        encoded = tokenizer(docs, return_attention_mask=False)["input_ids"]
        lengths = [len(bos.text_ids(x) if bos is not None else x) for x in encoded]
        eligible = sum(n for n in lengths if n > seqlen)
        if eligible == 0:
            raise LLMPruneError(f"too little calibration text: no document is longer than seqlen={seqlen} tokens")
        if eligible < nsamples * seqlen and not allow_overlap:
            raise LLMPruneError(
                f"too little calibration text: documents longer than {seqlen} tokens hold {eligible} tokens, "
                f"fewer than nsamples x seqlen = {nsamples * seqlen}; lower --nsamples/--seqlen or pass --allow-overlap"
            )
    out = torch.empty(nsamples, seqlen, dtype=torch.int64)
    for s in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if len(ids(i)) > seqlen:
                break
        start = rng.randint(0, len(ids(i)) - seqlen - 1)
        out[s] = torch.tensor(ids(i)[start : start + seqlen])
    return bos.windows(out) if bos is not None else out


def sample_stream_windows(stream: list[int], nsamples: int, seqlen: int, seed: int,
                          allow_overlap: bool = False, bos: BosPlan | None = None) -> torch.Tensor:
    """Random windows of a tokenized text stream (Wanda/SparseGPT WikiText-2 loader).

    `bos`: the stream passes through `bos.text_ids` and the windows through `bos.windows`."""
    if bos is not None:
        stream = bos.text_ids(stream)
    if len(stream) <= seqlen or (len(stream) < nsamples * seqlen and not allow_overlap):
        raise LLMPruneError(
            f"too little calibration text: {len(stream)} tokens for nsamples x seqlen = {nsamples * seqlen}; "
            "lower --nsamples/--seqlen" + ("" if len(stream) <= seqlen else " or pass --allow-overlap")
        )
    rng = random.Random(seed)
    t = torch.tensor(stream, dtype=torch.int64)
    out = torch.empty(nsamples, seqlen, dtype=torch.int64)
    for s in range(nsamples):
        start = rng.randint(0, len(stream) - seqlen - 1)
        out[s] = t[start : start + seqlen]
    return bos.windows(out) if bos is not None else out


def load_token_file(path: Path) -> torch.Tensor:
    """A saved (n, seqlen) int64 token tensor: .pt (torch.save), .safetensors (one tensor) or .npy."""
    try:
        if path.suffix == ".pt":
            t = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise LLMPruneError(f"{path} holds {len(tensors)} tensors; expected exactly one (n, seqlen) int64 tensor")
            t = next(iter(tensors.values()))
        else:
            import numpy as np

            t = torch.from_numpy(np.load(path, allow_pickle=False))
    except LLMPruneError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LLMPruneError(f"cannot read token file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.int64:
        desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise LLMPruneError(f"token file {path} must hold an int64 tensor of shape (n, seqlen), got {desc}")
    if t.shape[0] < 1 or t.shape[1] < 2:
        raise LLMPruneError(f"token file {path} holds no calibration windows: its tensor has shape {tuple(t.shape)}; "
                            "it needs at least one row of at least 2 token ids, (n, seqlen) with n >= 1")
    return t


def is_token_file(source: str) -> bool:
    """A calibration source that names a saved token tensor (used as given, windows and all)."""
    return Path(source).suffix in TOKEN_SUFFIXES


def as_used(cfg: CalibrationConfig, data: CalibrationData) -> CalibrationConfig:
    """`cfg` with the nsamples and seqlen of the windows used: a token file's own shape (it is used as given),
    so that a record's config and its calibration agree."""
    if is_token_file(cfg.source) and (cfg.nsamples, cfg.seqlen) != (data.nsamples, data.seqlen):
        import dataclasses

        return dataclasses.replace(cfg, nsamples=data.nsamples, seqlen=data.seqlen)
    return cfg


def load_calibration(cfg: CalibrationConfig, tokenizer=None, vocab_size: int | None = None,
                     model_config=None) -> CalibrationData:
    """Calibration windows for `cfg.source`: a named dataset, a local text file, or a saved token tensor.

    Text is windowed under the BOS policy `cfg.bos`, resolved for `tokenizer` and `model_config` (the model's
    `config`; without it `auto` cannot tell a model that needs BOS on every window). Token tensors are used as
    given."""
    src = cfg.source
    path = Path(src).expanduser()
    if path.suffix in TOKEN_SUFFIXES:
        if not path.is_file():
            raise LLMPruneError(f"calibration token file not found: {path}")
        tokens = load_token_file(path)
        if (cfg.nsamples, cfg.seqlen) != tuple(tokens.shape):
            log.info("token file %s used as given: %d windows of %d tokens", path, *tokens.shape)
        if cfg.bos != "auto":
            log.info("token file %s used as given: the BOS policy %r does not apply to it", path, cfg.bos)
        data = CalibrationData(tokens, str(path), "token ids used as given", AS_GIVEN_PLAN)
    elif path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise LLMPruneError(f"calibration file not found: {path}")
        if tokenizer is None:
            raise LLMPruneError("a tokenizer is needed to calibrate on text")
        bos = resolve_bos(cfg.bos, tokenizer, model_config)
        if path.suffix == ".txt":
            stream = _encode(tokenizer, path.read_text())
            tokens = sample_stream_windows(stream, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.allow_overlap, bos)
            desc = f"random windows of the text stream {path}"
        else:
            tokens = sample_document_windows(read_documents(path), tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed,
                                             cfg.allow_overlap, bos)
            desc = f"random windows of random documents longer than seqlen, {path}"
        data = CalibrationData(tokens, str(path), desc, bos)
    elif src in NAMED_SOURCES:
        if tokenizer is None:
            raise LLMPruneError("a tokenizer is needed to calibrate on text")
        bos = resolve_bos(cfg.bos, tokenizer, model_config)
        data_dir = resolve_data_dir(cfg.data_dir)
        text, where = named_source_text(src, "train", data_dir)
        if src == "c4":
            tokens = sample_document_windows(text, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.allow_overlap,
                                             bos)
        else:
            tokens = sample_stream_windows(_encode(tokenizer, " ".join(text)), cfg.nsamples, cfg.seqlen, cfg.seed,
                                           cfg.allow_overlap, bos)
        data = CalibrationData(tokens, src, where, bos)
    else:
        raise LLMPruneError(
            f"unknown calibration source {src!r}: give a named dataset ({', '.join(NAMED_SOURCES)}), "
            f"a text file ({', '.join(TEXT_SUFFIXES)}) or a token file ({', '.join(TOKEN_SUFFIXES)})"
        )
    if vocab_size is not None:
        check_token_ids(data.tokens, vocab_size)
    log.info("calibration: %d x %d tokens from %s (sha256 %s, BOS %s)", data.nsamples, data.seqlen, data.description,
             data.sha256[:16], data.bos.resolved if data.bos is not None else "-")
    return data
