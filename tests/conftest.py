"""Tiny, seeded models of several families built from configs in code, and a tiny tokenizer. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
T.logging.set_verbosity_error()

VOCAB = 96
_DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# family -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(_DEC)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(_DEC, sliding_window=8)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_DEC)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(_DEC, head_dim=8)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(_DEC, head_dim=8, sliding_window=8)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(_DEC, num_hidden_layers=3, head_dim=8, sliding_window=4, sliding_window_pattern=2)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(_DEC, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                                   eos_token_id=0)),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, max_position_embeddings=64)),
}


def tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = VOCAB, **overrides):
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(vocab_size=vocab_size, **{**kw, **overrides}))
    return model.eval()


def calib_tokens(n: int = 4, seqlen: int = 16, seed: int = 1, vocab_size: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seqlen), generator=g)


def tiny_tokenizer(vocab_size: int = VOCAB, bos: bool = False):
    """A byte-level BPE trained in code on a few sentences (no download). `bos=True`: it also has a `<bos>` token
    and puts it at the start of every text it encodes (as Gemma's and Llama-2's tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"] + (["<bos>"] if bos else []),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:80])
    text = ["the quick brown fox jumps over the lazy dog. " * 4, "pruning large language models after training. " * 4]
    tok.train_from_iterator(text, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                     **({"bos_token": "<bos>"} if bos else {}))
    return fast


@pytest.fixture(autouse=True, scope="session")
def _gguf_cache_in_tmp(tmp_path_factory):
    """GGUF conversions that tests cache go to a temporary folder, not the user's Hugging Face cache."""
    old = os.environ.get("LLMPRUNE_CACHE")
    os.environ["LLMPRUNE_CACHE"] = str(tmp_path_factory.mktemp("llmprune-cache"))
    yield
    if old is None:
        os.environ.pop("LLMPRUNE_CACHE", None)
    else:
        os.environ["LLMPRUNE_CACHE"] = old


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama with a tokenizer whose vocabulary matches the model."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def data_dir() -> Path:
    """The shared offline datasets: $LLMPRUNE_DATA_DIR or ../shared/data beside the checkout."""
    d = Path(os.environ.get("LLMPRUNE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    assert d.is_dir(), f"shared data not found at {d}; set LLMPRUNE_DATA_DIR"
    return d


@pytest.fixture(autouse=True)
def _restore_progress_env(monkeypatch):
    """`-q` sets TQDM_DISABLE for the rest of the process (right for the CLI); a test must not leak it."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    yield
