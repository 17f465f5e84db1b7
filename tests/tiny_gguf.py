"""Write a tiny Llama GGUF file in code (gguf's GGUFWriter), with a byte-level BPE tokenizer, for load/cache tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ggml file types (llama.cpp's LLAMA_FTYPE): what general.file_type records
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def _byte_bpe(vocab_size: int = 300):
    """A byte-level BPE over all 256 bytes plus a few merges, trained in code on two sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 4,
                             "pruning large language models after training. " * 4], trainer)
    return tok


def write_tiny_gguf(path: str | Path, qtype: str = "Q8_0", seed: int = 0, hidden: int = 32, layers: int = 2,
                    ffn: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-block Llama whose linear weights are stored as `qtype` (Q8_0, Q4_1, F16, BF16 or F32), norms as F32,
    and the tiny conftest tokenizer (its BPE vocabulary and merges) as a gpt2-style GGUF tokenizer."""
    import gguf

    tok = json.loads(_byte_bpe().to_str())
    vocab = tok["model"]["vocab"]  # token -> id
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    eos = vocab["<eos>"]
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_file_type(FILE_TYPE[qtype])
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<eos>" else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    def weight(name: str, rows: int, cols: int) -> None:
        x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)  # (out_features, in_features)
        q = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(name, x)
        elif qtype == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)

    def norm(name: str) -> None:
        # bfloat16-exact values (the checkpoint was bf16 before conversion), stored as F32 like llama.cpp does
        x = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        w.add_tensor(name, (x.view(np.uint32) & 0xFFFF0000).view(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", hidden, hidden)
        weight(f"blk.{i}.attn_k.weight", hidden * kv_heads // heads, hidden)
        weight(f"blk.{i}.attn_v.weight", hidden * kv_heads // heads, hidden)
        weight(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
