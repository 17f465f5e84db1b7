"""Perplexity: the papers' windowing and exp(mean NLL), against a hand computation on a toy model."""

import math

import pytest
import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.evaluation.perplexity import load_eval_tokens, perplexity

from conftest import data_dir, tiny_model, tiny_tokenizer


class BigramToy(nn.Module):
    """logits[t] = table[token[t]]: the NLL of each next token is -log softmax(table[prev])[next]."""

    def __init__(self, vocab=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation():
    toy = BigramToy()
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4, 1, 3, 3])  # 11 tokens, seqlen 4 -> 2 windows, tail of 3 dropped
    r = perplexity(toy, ids, 4, batch_size=2)
    logp = torch.log_softmax(toy.table.detach().double(), dim=-1)
    window_means = []
    for w in (ids[:4], ids[4:8]):
        window_means.append(-sum(float(logp[w[t], w[t + 1]]) for t in range(3)) / 3)
    expected = math.exp(sum(window_means) / 2)
    assert r["windows"] == 2 and r["seqlen"] == 4 and r["tokens"] == 8
    assert r["ppl"] == pytest.approx(expected, rel=1e-6)
    assert perplexity(toy, ids, 4, batch_size=1)["ppl"] == pytest.approx(expected, rel=1e-6)
    assert perplexity(toy, ids, 4, max_windows=1)["windows"] == 1


def test_perplexity_of_tiny_model_equals_plain_loop():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3))
    r = perplexity(model, ids, 16, batch_size=3)
    nlls = []
    with torch.no_grad():
        for i in range(4):
            x = ids[i * 16 : (i + 1) * 16].unsqueeze(0)
            nlls.append(float(model(input_ids=x, labels=x).loss))
    assert r["ppl"] == pytest.approx(math.exp(sum(nlls) / 4), rel=1e-5)


def test_too_short_text_is_an_error():
    with pytest.raises(LLMPruneError, match="shorter than one window"):
        perplexity(BigramToy(), torch.tensor([1, 2, 3]), 8)


def test_local_wikitext2_is_joined_with_blank_lines():
    tok = tiny_tokenizer()
    ids, where = load_eval_tokens("wikitext2", tok, data_dir())
    assert "wikitext-2-raw-v1.test.jsonl" in where
    assert ids.dim() == 1 and ids.numel() > 100_000
    with pytest.raises(LLMPruneError, match="did you mean 'wikitext2'"):
        load_eval_tokens("wikitext", tok, data_dir())


def test_progress_bar_counts_windows_and_honours_tqdm_disable(capsys, monkeypatch):
    ids = torch.arange(40) % 5  # seqlen 4 -> 10 windows, batches of 3, 3, 2, 2
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")  # a live bar although capsys's stderr is not a terminal
    capsys.readouterr()
    perplexity(BigramToy(), ids, 4, batch_size=3, desc="perplexity toy")
    err = capsys.readouterr().err
    assert "perplexity toy" in err and "/10 [" in err and "window" in err
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --quiet sets, after tqdm was imported
    perplexity(BigramToy(), ids, 4, batch_size=3, desc="perplexity toy")
    assert "perplexity toy" not in capsys.readouterr().err
