"""Sparsity accounting of a model's Transformer-block linear layers."""

from __future__ import annotations

from torch import nn

from ..masks import check_nm
from ..models import find_blocks, linear_layers, weight_oi


def sparsity_summary(model: nn.Module, n: int | None = None, m: int | None = None) -> dict:
    """Zeros per linear layer and in total; total and non-zero parameters; optional N:M validity."""
    blocks = find_blocks(model)
    layers, zeros, size, nm_ok = {}, 0, 0, True
    for i, block in enumerate(blocks.modules):
        for name, layer in linear_layers(block).items():
            w = weight_oi(layer)
            z = int((w == 0).sum())
            layers[f"{blocks.path}.{i}.{name}"] = z / w.numel()
            zeros += z
            size += w.numel()
            if n is not None and m is not None:
                nm_ok = nm_ok and check_nm(w, n, m)
    from .compression import zero_counts

    counts = zero_counts(model)  # all parameters, tied ones once
    out = {"layers": layers, "block_linear_sparsity": zeros / max(1, size), "block_linear_params": size,
           "total_params": counts["model_params"], "nonzero_params": counts["model_params"] - counts["model_zeros"]}
    if n is not None and m is not None:
        out["nm_valid"] = nm_ok
    return out
