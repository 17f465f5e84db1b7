"""GGUF inputs: the conversion cache (miss, hit, --no-cache, damaged entries, keys), the save dtype, and the model
card's size sentence. Tiny Llama GGUF files are written in code (tests/tiny_gguf.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune import gguf_cache
from llmprune.cli import main
from llmprune.masks import check_nm
from llmprune.models import cast_for_save_, load_model, resolve_save_dtype

from conftest import data_dir, tiny_model, tiny_tokenizer
from tiny_gguf import write_tiny_gguf

TEXTS = ["the quick brown fox", "pruning large language models<eos> after training!", "  odd\tspacing ü"]


def _header_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: dtype} straight from a safetensors file's JSON header (8-byte length, then the JSON)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "models" / "tiny.Q8_0.gguf", "Q8_0")


@pytest.fixture
def conversions(monkeypatch):
    """Counts the GGUF conversions (model and tokenizer) that transformers is asked for."""
    calls = {"model": 0, "tokenizer": 0}
    model_fp, tok_fp = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model(*a, **k):
        calls["model"] += "gguf_file" in k
        return model_fp(*a, **k)

    def tok(*a, **k):
        calls["tokenizer"] += "gguf_file" in k
        return tok_fp(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tok)
    return calls


def _fresh(path: Path, dtype: torch.dtype):
    """A conversion by transformers alone, the reference a cached model must equal."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and all(ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]) for k in ba)


# ---------------------------------------------------------------- the cache


def test_miss_then_hit_converts_once_and_gives_the_same_model_and_tokenizer(gguf_file, tmp_path, conversions):
    cache = tmp_path / "cache"
    first = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    assert conversions == {"model": 1, "tokenizer": 1} and not first.from_cache
    entry = Path(first.cache_entry)
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert entry.parent == cache / "gguf" and entry.name.startswith(sha)
    assert transformers.__version__ in entry.name and (entry / gguf_cache.MANIFEST).is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    second = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    assert conversions == {"model": 1, "tokenizer": 1}, "a cache hit must not convert the GGUF again"
    assert second.from_cache and second.cache_entry == str(entry) and second.gguf["sha256"] == sha
    assert (second.source, second.gguf_file) == (str(gguf_file), "tiny.Q8_0.gguf")  # records still name the GGUF
    _same_tensors(first.model, second.model)
    for text in TEXTS:
        ids = first.tokenizer(text).input_ids
        assert second.tokenizer(text).input_ids == ids and second.tokenizer.decode(ids) == first.tokenizer.decode(ids)
    assert second.tokenizer.eos_token == first.tokenizer.eos_token == "<eos>"
    assert second.model.config.name_or_path == first.model.config.name_or_path == str(gguf_file.parent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cached_model_equals_a_fresh_conversion_at_the_dtype_asked_for(tmp_path, dtype):
    path = write_tiny_gguf(tmp_path / "tiny.Q4_1.gguf", "Q4_1")
    reference = _fresh(path, dtype)
    miss = load_model(str(path), dtype, cache_dir=tmp_path / "c")  # converted at float32, cached, reloaded
    hit = load_model(str(path), dtype, cache_dir=tmp_path / "c")
    assert not miss.from_cache and hit.from_cache
    _same_tensors(reference, miss.model)
    _same_tensors(reference, hit.model)


@pytest.mark.parametrize("qtype, weights, norms", [("Q4_1", "F32", "BF16"), ("Q8_0", "F32", "BF16"),
                                                   ("F16", "F16", "F32"), ("BF16", "BF16", "BF16")])
def test_cache_stores_each_tensor_in_the_gguf_half_precision_only_where_lossless(tmp_path, qtype, weights, norms):
    """Block-quantized values (scale x small integer) need float32; an F16/BF16 GGUF's weights fit their own type;
    the F32 norms (bf16-exact here) fit bfloat16 but not always float16 (they are kept when they don't)."""
    path = write_tiny_gguf(tmp_path / f"tiny.{qtype}.gguf", qtype)
    entry = Path(load_model(str(path), torch.float32, cache_dir=tmp_path / "c").cache_entry)
    dtypes = _header_dtypes(entry / "model.safetensors")
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == weights
    assert dtypes["model.embed_tokens.weight"] == weights
    if norms == "F32":  # float16 holds these bf16-exact norms only when they happen to be representable
        ref = _fresh(path, torch.float32).model.norm.weight
        norms = "F16" if torch.equal(ref.half().float(), ref) else "F32"
    assert dtypes["model.norm.weight"] == norms
    manifest = json.loads((entry / gguf_cache.MANIFEST).read_text())
    assert manifest["gguf_dtype"] == {"Q4_1": None, "Q8_0": None, "F16": "float16", "BF16": "bfloat16"}[qtype]


def test_no_cache_neither_reads_nor_writes(gguf_file, tmp_path, conversions):
    cache = tmp_path / "cache"
    load_model(str(gguf_file), torch.float32, cache_dir=cache)  # an entry exists now
    loaded = load_model(str(gguf_file), torch.float32, cache_dir=cache, use_cache=False)
    assert conversions["model"] == 2 and not loaded.from_cache and loaded.cache_entry is None
    other = tmp_path / "other-cache"
    load_model(str(gguf_file), torch.bfloat16, cache_dir=other, use_cache=False)
    assert not other.exists()


def test_incomplete_or_corrupt_entries_are_ignored_and_rebuilt(gguf_file, tmp_path, conversions, caplog):
    cache = tmp_path / "cache"
    reference = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    entry = Path(reference.cache_entry)

    (entry / gguf_cache.MANIFEST).unlink()  # a folder without its completion marker
    again = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    assert conversions["model"] == 2 and not again.from_cache and (entry / gguf_cache.MANIFEST).is_file()

    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # complete manifest, damaged weights
    with caplog.at_level("WARNING"):
        again = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    assert conversions["model"] == 3 and not again.from_cache and "could not be read" in caplog.text
    _same_tensors(reference.model, again.model)
    hit = load_model(str(gguf_file), torch.float32, cache_dir=cache)  # the rebuilt entry is whole again
    assert hit.from_cache and conversions["model"] == 3
    _same_tensors(reference.model, hit.model)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def test_key_is_the_file_content(gguf_file, tmp_path):
    cache = tmp_path / "cache"
    a = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    other = write_tiny_gguf(tmp_path / "models" / "tiny2.Q8_0.gguf", "Q8_0", seed=1)
    b = load_model(str(other), torch.float32, cache_dir=cache)
    assert not b.from_cache and a.cache_entry != b.cache_entry
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_file, copy)
    c = load_model(str(copy), torch.float32, cache_dir=cache)  # same bytes, other name: the same entry
    assert c.from_cache and c.cache_entry == a.cache_entry and (c.source, c.gguf_file) == (str(copy), "renamed.gguf")


def test_a_failed_cache_write_leaves_nothing_and_the_run_goes_on(gguf_file, tmp_path, monkeypatch, caplog):
    def no_space(self, *a, **k):
        Path(a[0]).mkdir(parents=True, exist_ok=True)
        (Path(a[0]) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING"):
        loaded = load_model(str(gguf_file), torch.bfloat16, cache_dir=cache)
    assert "could not write" in caplog.text and loaded.cache_entry is None
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    _same_tensors(_fresh(gguf_file, torch.bfloat16), loaded.model)
    assert list((cache / "gguf").iterdir()) == []


def test_a_complete_entry_written_meanwhile_by_another_run_is_kept(gguf_file, tmp_path):
    cache = tmp_path / "cache"
    loaded = load_model(str(gguf_file), torch.float32, cache_dir=cache)
    entry = Path(loaded.cache_entry)
    before = (entry / gguf_cache.MANIFEST).read_text()
    manifest = json.loads(before)
    assert gguf_cache.write_entry(entry, loaded.model, loaded.tokenizer, {"sha256": manifest["sha256"]}, torch.bfloat16)
    assert (entry / gguf_cache.MANIFEST).read_text() == before
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_sha256_and_cache_location(tmp_path, monkeypatch):
    f = tmp_path / "blob.bin"
    data = bytes(range(256)) * 1000
    f.write_bytes(data)
    assert gguf_cache.file_sha256(f, chunk=1000) == hashlib.sha256(data).hexdigest()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("LLMPRUNE_CACHE", raising=False)
    assert gguf_cache.cache_root() == tmp_path / "hf" / "llmprune"
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "env"))
    assert gguf_cache.cache_root() == tmp_path / "env"
    assert gguf_cache.cache_root(tmp_path / "given") == tmp_path / "given"


@pytest.mark.parametrize("qtype, expected", [("Q8_0", None), ("Q4_1", None), ("F16", torch.float16),
                                             ("BF16", torch.bfloat16), ("F32", torch.float32)])
def test_gguf_dtype_and_save_dtype_auto(tmp_path, qtype, expected):
    path = write_tiny_gguf(tmp_path / f"t.{qtype}.gguf", qtype)
    assert gguf_cache.gguf_dtype(path) == expected
    loaded = load_model(str(path), torch.float32, use_cache=False)
    assert resolve_save_dtype("auto", loaded, torch.float32) == (expected or torch.bfloat16)
    assert resolve_save_dtype("float16", loaded, torch.float32) == torch.float16


# ---------------------------------------------------------------- the save dtype


def test_cast_for_save_keeps_zeros_exact_and_refuses_overflow():
    lin = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 1.5, -2.0]]))
    cast_for_save_(lin, torch.float16)  # 1e-30 underflows in float16; -1e-30 would give -0.0
    w = lin.weight
    assert w.dtype == torch.float16 and w.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.5, -2.0]]
    assert not torch.signbit(w[w == 0]).any()
    lin2 = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin2.weight.copy_(torch.tensor([[0.0, -1e-30, 1.0]]))
    cast_for_save_(lin2, torch.bfloat16)  # bfloat16 has float32's range: the tiny value stays non-zero
    assert lin2.weight.dtype == torch.bfloat16 and lin2.weight[0, 1] != 0 and not torch.signbit(lin2.weight[0, 0])
    big = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        big.weight.copy_(torch.tensor([[1.0, 7e4]]))
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="weight holds values up to 7e\\+04.*--save-dtype bfloat16"):
        cast_for_save_(big, torch.float16)
    assert big.weight.dtype == torch.float32  # nothing changed


def _prune_args(model, out, *extra):
    return ["--model", str(model), "--calib-data", "c4", "--data-dir", str(data_dir()), "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--eval-ppl", "none", "-q", "--output-dir", str(out), *extra]


def test_prune_gguf_saves_bfloat16_by_default_with_exact_zeros_and_a_true_card(gguf_file, tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    assert main(_prune_args(gguf_file, out, "--method", "wanda", "--pattern", "2:4", "--cache-dir", str(cache))) == 0
    assert any((cache / "gguf").iterdir())
    dtypes = _header_dtypes(out / "model.safetensors")
    assert set(dtypes.values()) == {"BF16"}
    rec = json.loads((out / "llmprune.json").read_text())
    assert rec["config"]["dtype"] == "float32" and rec["config"]["save_dtype"] == "bfloat16"
    assert rec["gguf"]["file"] == gguf_file.name and rec["gguf"]["dtype"] == "quantized"
    assert rec["gguf"]["bytes"] == gguf_file.stat().st_size
    assert rec["gguf"]["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    zeros = total = 0
    for name, p in model.named_parameters():
        if "layers" in name and p.dim() == 2:
            assert check_nm(p, 2, 4), name
            assert not torch.signbit(p[p == 0]).any(), f"{name}: -0.0 saved"
            zeros, total = zeros + int((p == 0).sum()), total + p.numel()
    assert zeros / total == pytest.approx(rec["sparsity"])  # the cast made no zeros and lost none
    card = (out / "README.md").read_text()
    size = (out / "model.safetensors").stat().st_size
    assert f"The weights take {size / 1e6:.1f} MB on disk (`bfloat16` safetensors)" in card \
        or f"The weights take {size / 1e3:.1f} kB on disk (`bfloat16` safetensors)" in card
    assert "saves no space" in card and "as large as the dense model" not in card
    assert f"more than the GGUF file it came from ({gguf_file.stat().st_size / 1e3:.1f} kB)" in card
    assert "--save-dtype bfloat16" in card  # the reproduce command

    out2 = tmp_path / "out32"
    assert main(_prune_args(gguf_file, out2, "--method", "magnitude", "--cache-dir", str(cache),
                            "--save-dtype", "float32")) == 0
    assert set(_header_dtypes(out2 / "model.safetensors").values()) == {"F32"}
    assert json.loads((out2 / "llmprune.json").read_text())["gguf"]["from_cache"] is True
    assert (out2 / "model.safetensors").stat().st_size > 1.9 * size


def test_save_dtype_auto_for_a_model_folder_is_its_config_dtype(tmp_path, capsys):
    tok = tiny_tokenizer()
    d = tmp_path / "bf16-model"
    tiny_model("llama", vocab_size=len(tok)).to(torch.bfloat16).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "out"
    assert main(_prune_args(d, out, "--method", "magnitude")) == 0  # processed in float32 on the CPU
    assert set(_header_dtypes(out / "model.safetensors").values()) == {"BF16"}
    rec = json.loads((out / "llmprune.json").read_text())
    assert (rec["config"]["dtype"], rec["config"]["save_dtype"], rec["gguf"]) == ("float32", "bfloat16", None)
    assert main(_prune_args(d, tmp_path / "bad", "--save-dtype", "int8")) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_card_size_sentence_for_block_removal(tmp_path):
    from llmprune.export import make_model_card

    rec = {"model": "some/model", "architecture": "LlamaForCausalLM", "sparsity": 0.0,
           "config": {"prune": None, "blocks": {"method": "block-influence", "num_blocks": 2}, "calibration": {},
                      "eval": None, "dtype": "float32", "save_dtype": "float16"},
           "blocks": {"removed": [3, 4], "num_blocks_before": 8, "num_blocks_after": 6, "params_before": 1000,
                      "params_after": 750}}
    text = make_model_card(rec, weights={"bytes": 2_500_000, "dtypes": {"float16": 750}}).text
    assert "The weights take 2.5 MB on disk (`float16` safetensors)." in text
    assert "Removing 2 of 8 blocks is what made it smaller: 750 parameters instead of 1,000." in text
    assert "saves no space" not in text  # no weight sparsity here
    assert "weights saved as `float16`" in text
    text = make_model_card(rec).text  # no folder: no size claimed
    assert "The weights are saved as `float16`." in text and "on disk" not in text
