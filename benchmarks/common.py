"""What the GPU benchmarks share: model shapes, random-initialized Llama models built from them, the measured
bf16 matmul rate, JSON output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # LLaMA-30B (32.5 B parameters, 60.5 GiB in bf16): kept in host memory, one block at a time on the GPU
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, max_position_embeddings=256),
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_runs(fn, dev, warmup: int, runs: int) -> list[float]:
    """Wall seconds of `runs` calls after `warmup` calls, the device synchronized around each."""
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(runs):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def matmul_rate(dev: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 30) -> float:
    """Dense matmul FLOP/s on random data (median of timed runs)."""
    if dev.type != "cuda":
        n, iters = 256, 3
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def build(shape: str, dev: torch.device | str, dtype: torch.dtype, layers: int | None = None, **config):
    """A random-initialized LlamaForCausalLM of `shape` (optionally only `layers` blocks), made on `dev`
    ("meta": the skeleton only), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape], **config)
    if layers:
        kw["num_hidden_layers"] = layers
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(LlamaConfig(**kw))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()
