"""Calibration sources: named datasets from local files, text files, token tensors; seeded sampling; errors."""

import json

import numpy as np
import pytest
import torch

from llmprune.calibration.data import (load_calibration, sample_document_windows, sample_stream_windows,
                                       token_hash)
from llmprune.config import CalibrationConfig
from llmprune.errors import LLMPruneError

from conftest import data_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_stream_windows_are_seeded_windows_of_the_stream():
    stream = list(range(1000))
    a = sample_stream_windows(stream, 5, 16, seed=0)
    b = sample_stream_windows(stream, 5, 16, seed=0)
    c = sample_stream_windows(stream, 5, 16, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 16) and a.dtype == torch.int64
    for row in a:  # each window is a contiguous piece of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16))


def test_document_windows_come_from_documents_longer_than_seqlen(tok):
    docs = ["short", "the quick brown fox jumps over the lazy dog " * 20, "tiny"]
    ids = tok(docs[1])["input_ids"]
    w = sample_document_windows(docs, tok, 3, 8, seed=0, allow_overlap=True)
    for row in w.tolist():
        assert any(ids[i : i + 8] == row for i in range(len(ids) - 7))


def test_too_little_text_is_refused(tok):
    with pytest.raises(LLMPruneError, match="no document is longer than seqlen=64"):
        sample_document_windows(["a b c", "d e f"], tok, 2, 64, seed=0)
    with pytest.raises(LLMPruneError, match="fewer than nsamples x seqlen"):
        sample_document_windows(["word " * 40], tok, 100, 16, seed=0)
    with pytest.raises(LLMPruneError, match="too little calibration text"):
        sample_stream_windows(list(range(100)), 10, 64, seed=0)


def test_local_c4_and_text_files(tok, tmp_path):
    cfg = CalibrationConfig(source="c4", nsamples=4, seqlen=32, seed=0, data_dir=str(data_dir()))
    a = load_calibration(cfg, tok)
    b = load_calibration(cfg, tok)
    assert a.tokens.shape == (4, 32) and torch.equal(a.tokens, b.tokens) and a.sha256 == b.sha256
    assert "c4_validation_2k.parquet" in a.description
    txt = tmp_path / "corpus.txt"
    txt.write_text("pruning large language models after training. " * 200)
    t = load_calibration(CalibrationConfig(source=str(txt), nsamples=3, seqlen=16), tok)
    assert t.tokens.shape == (3, 16)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "the quick brown fox " * 30}) for _ in range(5)))
    j = load_calibration(CalibrationConfig(source=str(jl), nsamples=3, seqlen=16), tok)
    assert j.tokens.shape == (3, 16)


def test_local_wikitext2_train_is_missing_and_says_why(tok):
    with pytest.raises(LLMPruneError, match="only the test split is available locally"):
        load_calibration(CalibrationConfig(source="wikitext2", nsamples=2, seqlen=16, data_dir=str(data_dir())), tok)


def test_token_files_are_used_as_given(tmp_path):
    t = torch.randint(0, 50, (3, 7))
    torch.save(t, tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", t.numpy())
    from safetensors.torch import save_file

    save_file({"ids": t}, str(tmp_path / "t.safetensors"))
    for name in ("t.pt", "t.npy", "t.safetensors"):
        d = load_calibration(CalibrationConfig(source=str(tmp_path / name), nsamples=128, seqlen=2048))
        assert torch.equal(d.tokens, t) and d.sha256 == token_hash(t)
    torch.save(t.int(), tmp_path / "bad.pt")
    with pytest.raises(LLMPruneError, match="int64 tensor of shape"):
        load_calibration(CalibrationConfig(source=str(tmp_path / "bad.pt")))
    with pytest.raises(LLMPruneError, match="must lie in"):
        load_calibration(CalibrationConfig(source=str(tmp_path / "t.pt")), vocab_size=10)


def test_unknown_source_and_missing_file(tmp_path):
    with pytest.raises(LLMPruneError, match="unknown calibration source 'pile'"):
        load_calibration(CalibrationConfig(source="pile"))
    with pytest.raises(LLMPruneError, match="not found"):
        load_calibration(CalibrationConfig(source=str(tmp_path / "missing.txt")))


def test_hub_unreachable_names_the_fix(tok, monkeypatch):
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    with pytest.raises(LLMPruneError, match="--data-dir"):
        load_calibration(CalibrationConfig(source="c4", nsamples=2, seqlen=16), tok)


def test_local_c4_calibration_never_overlaps_the_c4_evaluation_documents(tok):
    from llmprune.calibration.data import C4_EVAL_DOCS, named_source_text

    train, where_t = named_source_text("c4", "train", data_dir())
    valid, where_v = named_source_text("c4", "validation", data_dir())
    assert "kept for evaluation" in where_t
    assert not set(train) & set(valid[:C4_EVAL_DOCS])
    assert train == valid[C4_EVAL_DOCS:]
