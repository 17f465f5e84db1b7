"""Compression accounting of a pruned model: parameters, sparsity per layer and block, N:M validity, and the
theoretical FLOPs of one forward pass, dense and counting non-zero weights only.

FLOPs follow the usual convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Sec. 2.1): a
multiply-add is 2 FLOPs, so a linear layer with P weights costs 2 P FLOPs per token; biases, norms, activations
and softmax are left out. Attention adds QK^T and AV: 2 x 2 x seqlen^2 x n_heads x head_dim per layer when the
whole score matrix is counted. A causal mask needs only half of it; `causal=True` halves that term, and every
report says which convention it used. Sliding-window layers are counted as full attention (an upper bound).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import LLMPruneError
from ..masks import check_nm
from ..models.arch import find_blocks, linear_layers, weight_oi

log = logging.getLogger(__name__)

# Families whose MLP is up -> act -> down (two matrices); every other family is taken as gated (three).
UNGATED_MLP_TYPES = frozenset({
    "gpt2", "opt", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon", "phi", "starcoder2", "codegen", "gpt_neo",
    "mpt", "bert", "biogpt", "xglm",
})
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads")
_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first_int(cfg, keys) -> int | None:
    for key in keys:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def attention_shape(config) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of a (text) config: num_attention_heads / n_head, num_key_value_heads
    (default: n_heads), head_dim or hidden_size // n_heads."""
    cfg = _text_config(config)
    heads = _first_int(cfg, _HEADS_KEYS)
    if heads is None:
        raise LLMPruneError(f"{type(cfg).__name__} has no attention head count (looked for {', '.join(_HEADS_KEYS)})")
    kv = _first_int(cfg, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")) or heads
    head_dim = _first_int(cfg, ("head_dim",))
    if head_dim is None:
        hidden = _first_int(cfg, _HIDDEN_KEYS)
        if hidden is None:
            raise LLMPruneError(f"{type(cfg).__name__} has neither head_dim nor a hidden size")
        head_dim = hidden // heads
    return heads, kv, head_dim


def attention_flops(seqlen: int, n_heads: int, head_dim: int, n_layers: int, causal: bool = False) -> int:
    """Score (QK^T) and value (AV) FLOPs of one sequence: 2 x 2 x seqlen^2 x n_heads x head_dim per layer,
    halved when `causal` (only the lower triangle of the score matrix is needed)."""
    full = 2 * 2 * seqlen * seqlen * n_heads * head_dim * n_layers
    return full // 2 if causal else full


def _check_seqlen(seqlen: int) -> None:
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 1:
        raise LLMPruneError(f"seqlen must be a positive integer, got {seqlen!r}")


def forward_flops(config, seqlen: int = 2048, *, batch_size: int = 1, gated_mlp: bool | None = None,
                  include_lm_head: bool = True, causal: bool = False) -> dict:
    """Dense FLOPs of one forward pass of `batch_size` sequences of `seqlen` tokens, from a config alone.

    Linear FLOPs are 2 x (weights of every linear layer in the blocks + LM head) x tokens, the weights counted
    from the config: per block Q and O (hidden x n_heads*head_dim), K and V (hidden x n_kv_heads*head_dim), and an
    MLP of 3 (gated, Llama-style) or 2 (`gated_mlp=False`; inferred from the model type when None) matrices of
    hidden x intermediate; the LM head is vocab x hidden (OPT: x word_embed_proj_dim). Attention FLOPs as in
    `attention_flops`. Mixture-of-experts configs are refused. Returns plain ints and the settings used."""
    _check_seqlen(seqlen)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LLMPruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    cfg = _text_config(config)
    name = type(cfg).__name__
    for key in _MOE_KEYS:
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 1:
            raise LLMPruneError(f"{name} is a mixture of experts ({key}={v}); forward_flops models dense blocks only")
    hidden = _first_int(cfg, _HIDDEN_KEYS)
    n_layers = _first_int(cfg, _LAYERS_KEYS)
    if hidden is None or n_layers is None:
        raise LLMPruneError(f"{name} lacks a hidden size or a layer count; cannot count FLOPs from it")
    heads, kv_heads, head_dim = attention_shape(cfg)
    inter = _first_int(cfg, _INTERMEDIATE_KEYS) or 4 * hidden  # GPT-2 leaves n_inner=None for 4 x n_embd
    model_type = getattr(cfg, "model_type", "")
    if gated_mlp is None:
        gated_mlp = model_type not in UNGATED_MLP_TYPES

    attn_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # Q, O + K, V
    mlp_params = (3 if gated_mlp else 2) * hidden * inter
    block_linear = n_layers * (attn_params + mlp_params)
    vocab = _first_int(cfg, ("vocab_size",)) or 0
    head_in = _first_int(cfg, ("word_embed_proj_dim",)) or hidden
    lm_head = vocab * head_in if include_lm_head else 0

    tokens = batch_size * seqlen
    linear = 2 * block_linear * tokens
    head = 2 * lm_head * tokens
    attention = batch_size * attention_flops(seqlen, heads, head_dim, n_layers, causal)
    return {
        "seqlen": seqlen, "batch_size": batch_size, "tokens": tokens,
        "n_layers": n_layers, "n_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim,
        "gated_mlp": bool(gated_mlp),
        "block_linear_params": block_linear, "lm_head_params": lm_head,
        "linear": linear, "lm_head": head, "attention": attention,
        "attention_causal_halved": bool(causal),
        "total": linear + head + attention,
    }


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter once: tied weights (same Parameter, or views of the same storage) count once."""
    seen, out = set(), []
    for _, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            key = ("id", id(p))
        else:
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@torch.no_grad()
def zero_counts(model: nn.Module) -> dict:
    """Exact zeros of the blocks' linear weights and of all parameters (tied weights once, embeddings, norms and
    biases included): {"block_linear": fraction, "model": fraction, "block_linear_zeros", "block_linear_params",
    "model_zeros", "model_params"}. Counted with `count_nonzero`, one tensor at a time, on the tensors' devices."""
    blocks = find_blocks(model)
    lin_zeros = lin_size = 0
    for block in blocks.modules:
        for layer in linear_layers(block).values():
            w = weight_oi(layer)  # (out_features, in_features)
            lin_zeros += w.numel() - int(torch.count_nonzero(w))
            lin_size += w.numel()
    params = _unique_parameters(model)
    size = sum(p.numel() for p in params)
    zeros = size - sum(int(torch.count_nonzero(p)) for p in params)
    return {"block_linear": lin_zeros / lin_size if lin_size else 0.0, "model": zeros / size if size else 0.0,
            "block_linear_zeros": lin_zeros, "block_linear_params": lin_size, "model_zeros": zeros,
            "model_params": size}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _check_pattern(pattern) -> tuple[int, int] | None:
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in pattern)
    except (TypeError, ValueError):
        raise LLMPruneError(f"pattern must be a pair (n, m) such as (2, 4), got {pattern!r}") from None
    if not (1 <= n <= m):
        raise LLMPruneError(f"pattern {n}:{m}: N:M needs 1 <= N <= M")
    return n, m


@torch.no_grad()
def compression_report(model: nn.Module, dense_params: int | None = None, seqlen: int = 2048,
                       pattern: tuple[int, int] | None = None, *, causal: bool = False) -> dict:
    """Parameters, sparsity and theoretical FLOPs of a (pruned) causal LM; the model is only read.

    - `total_params`, `nonzero_params` over all parameters, tied weights once; a zero anywhere counts as pruned
      (a bias initialised to zero included). `compression_ratio` = total / non-zero. With `dense_params` (the
      count of the model before pruning, e.g. before blocks were removed) also `compression_ratio_vs_dense`.
    - `layers` / `blocks`: sparsity of each block linear layer and of each block (all its linear layers), and
      `block_linear_sparsity` over all of them.
    - `nm` (when `pattern=(n, m)`): validity of each layer and of all of them (`llmprune.masks.check_nm`).
    - `flops`: one forward pass of `seqlen` tokens; `dense` counts every weight of the block linear layers and
      the LM head, `sparse` only their non-zero weights; attention (same in both) as in `attention_flops`;
      `dense_over_sparse` is the ideal speed-up. Ratios are None where the denominator is zero."""
    _check_seqlen(seqlen)
    nm = _check_pattern(pattern)
    if dense_params is not None and (not isinstance(dense_params, int) or dense_params < 1):
        raise LLMPruneError(f"dense_params must be a positive integer, got {dense_params!r}")

    params = _unique_parameters(model)
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)

    blocks = find_blocks(model)
    layers, block_sparsity, nm_layers = {}, {}, {}
    lin_size = lin_nonzero = 0
    for i, block in enumerate(blocks.modules):
        b_size = b_nonzero = 0
        for name, layer in linear_layers(block).items():
            w = weight_oi(layer)  # (out_features, in_features)
            nz = int(torch.count_nonzero(w))
            key = f"{blocks.path}.{i}.{name}"
            layers[key] = 1.0 - nz / w.numel()
            b_size += w.numel()
            b_nonzero += nz
            if nm is not None:
                nm_layers[key] = check_nm(w, *nm)
        block_sparsity[f"{blocks.path}.{i}"] = 1.0 - b_nonzero / b_size if b_size else 0.0
        lin_size += b_size
        lin_nonzero += b_nonzero

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    head_size = head_w.numel() if head_w is not None else 0
    head_nonzero = int(torch.count_nonzero(head_w)) if head_w is not None else 0
    if head_w is None:
        log.warning("%s has no output embeddings; FLOPs leave out the LM head", type(model).__name__)

    heads, _, head_dim = attention_shape(model.config)
    attention = attention_flops(seqlen, heads, head_dim, len(blocks), causal)
    dense = 2 * (lin_size + head_size) * seqlen + attention
    sparse = 2 * (lin_nonzero + head_nonzero) * seqlen + attention

    out = {
        "total_params": total,
        "nonzero_params": nonzero,
        "compression_ratio": _ratio(total, nonzero),
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "block_linear_params": lin_size,
        "block_linear_nonzero": lin_nonzero,
        "block_linear_sparsity": 1.0 - lin_nonzero / lin_size if lin_size else 0.0,
        "blocks": block_sparsity,
        "layers": layers,
        "flops": {
            "seqlen": seqlen,
            "n_layers": len(blocks),
            "n_heads": heads,
            "head_dim": head_dim,
            "lm_head_params": head_size,
            "lm_head_nonzero": head_nonzero,
            "attention": attention,
            "attention_causal_halved": bool(causal),
            "dense": dense,
            "sparse": sparse,
            "dense_over_sparse": _ratio(dense, sparse),
        },
    }
    if dense_params is not None:
        out["dense_params"] = dense_params
        out["compression_ratio_vs_dense"] = _ratio(dense_params, nonzero)
    if nm is not None:
        out["nm"] = {"pattern": f"{nm[0]}:{nm[1]}", "valid": all(nm_layers.values()), "layers": nm_layers}
    return out


__all__ = ["compression_report", "zero_counts", "forward_flops", "attention_flops", "attention_shape", "UNGATED_MLP_TYPES"]
