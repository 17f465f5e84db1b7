"""GPU benchmarks on random-initialized models at real shapes (speed and memory don't depend on the values):

* ppl: WikiText-2-sized perplexity throughput (tokens/s) of a Llama-2-7B-shaped model in bf16, against the
  forward-pass floor 2 x parameters x tokens at the bf16 matmul rate measured in the same run (issue 3);
* prune: wall time (model load excluded), peak GPU and host memory of magnitude / Wanda / RIA / SparseGPT at
  50 % unstructured and 2:4, 128 windows of 2048 random token ids, blocks kept in host memory and moved to the
  GPU one at a time, against the floor of two forward passes (issue 5).

    python benchmarks/gpu_bench.py ppl prune --shape llama2-7b --out results/   [--smoke: tiny shape on CPU]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune import PruneConfig, prune  # noqa: E402
from llmprune.calibration.placement import auto_batch_size  # noqa: E402
from llmprune.evaluation.harness import _auto_ppl_batch  # noqa: E402
from llmprune.evaluation.perplexity import perplexity  # noqa: E402
from llmprune.scorers import SCORERS  # noqa: E402
from llmprune.versions import package_versions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, build, matmul_rate, sync, write_json  # noqa: E402

def build_on_host(shape: str, dev: torch.device, dtype: torch.dtype, layers: int | None = None):
    """A random-initialized model in host memory without a CPU-side random init (slow at 30B): the skeleton
    is made on the meta device, host memory is allocated, and each tensor is drawn on the GPU and copied."""
    model = build(shape, "meta", dtype, layers)
    cfg = model.config
    model.to_empty(device="cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.fill_(1.0)  # norms
        else:
            p.data.copy_((torch.randn(p.shape, device=dev, dtype=dtype, generator=g) * 0.02))
    rotary = type(model.model.rotary_emb)(cfg)  # its non-persistent buffers were not materialized above
    model.model.rotary_emb = rotary.to(dtype=torch.float32)
    return model.eval()


def linear_params(model) -> tuple[int, int]:
    """(parameters of the blocks' linear layers, of the LM head)."""
    blocks = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n)
    return blocks, model.lm_head.weight.numel()


def attention_flops(cfg, tokens_per_window: int, windows: int) -> float:
    # QK^T and PV: 2 matmuls x 2 FLOP x seqlen^2 x hidden per layer, causal half counted in full
    return 2 * 2 * tokens_per_window**2 * cfg.hidden_size * cfg.num_hidden_layers * windows


def _sdpa_priority(name: str):
    """A context that makes `name` the first SDPA backend tried ("default": torch's own order)."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH],
             "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[name]
    return sdpa_kernel(order, set_priority=True)


def _profile_top(fn, rows: int = 12) -> list[dict]:
    """CUDA time per kernel name over one call of fn (largest first)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True)
    total = sum(getattr(e, "device_time_total", 0) for e in ev) or 1
    return [{"kernel": e.key[:90], "cuda_ms": getattr(e, "device_time_total", 0) / 1e3,
             "share": getattr(e, "device_time_total", 0) / total, "calls": e.count} for e in ev[:rows]]


def bench_ppl(shape, dev, rate, smoke, compile_too: bool = True, extra_batches=(), backends=("default",),
              profile_too: bool = False) -> dict:
    model = build(shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    seqlen, windows = (2048, 160) if not smoke else (32, 4)  # ~WikiText-2 test with the Llama tokenizer
    ids = torch.randint(0, model.config.vocab_size, (seqlen * windows,), generator=torch.Generator().manual_seed(0))
    bs = _auto_ppl_batch(model, seqlen, dev)
    perplexity(model, ids[: seqlen * bs], seqlen, batch_size=bs, device=dev)  # warm-up
    runs = [perplexity(model, ids, seqlen, batch_size=bs, device=dev) for _ in range(2)]
    eager = min(runs, key=lambda x: x["seconds"])
    compiled = None
    tried = {}
    profile = None
    if dev.type == "cuda" and compile_too:
        for backend in backends:
            for b in sorted({bs, *(extra_batches or ())}):
                torch._dynamo.reset()
                with _sdpa_priority(backend):
                    t = time.perf_counter()
                    perplexity(model, ids, seqlen, batch_size=b, device=dev, compile=True)  # compiles
                    compile_s = time.perf_counter() - t
                    cruns = [perplexity(model, ids, seqlen, batch_size=b, device=dev, compile=True) for _ in range(3)]
                c = min(cruns, key=lambda x: x["seconds"])
                c["first_call_seconds_incl_compile"], c["batch_size"], c["sdpa"] = compile_s, b, backend
                torch.testing.assert_close(c["nll"], eager["nll"], rtol=2e-3, atol=0)
                tried[f"{backend}/{b}"] = [x["seconds"] for x in cruns]
                print(f"  compiled, sdpa {backend}, batch {b}: {min(tried[f'{backend}/{b}']):.2f} s", flush=True)
                if compiled is None or c["seconds"] < compiled["seconds"]:
                    compiled = c
        bs = compiled["batch_size"] if compiled["seconds"] < eager["seconds"] else bs
        if profile_too:
            torch._dynamo.reset()
            with _sdpa_priority(compiled["sdpa"]):
                x = ids[: seqlen * compiled["batch_size"]]
                perplexity(model, x, seqlen, batch_size=compiled["batch_size"], device=dev, compile=True)
                profile = _profile_top(lambda: perplexity(model, x, seqlen, batch_size=compiled["batch_size"],
                                                          device=dev, compile=True))
            for r in profile:
                print(f"    {r['share'] * 100:5.1f} %  {r['cuda_ms']:8.1f} ms  {r['calls']:5d}  {r['kernel']}", flush=True)
    r = compiled if compiled and compiled["seconds"] < eager["seconds"] else eager
    blk, head = linear_params(model)
    tokens = seqlen * windows
    floor_flops = 2 * (blk + head) * tokens
    all_params = sum(p.numel() for p in model.parameters())
    out = {"shape": shape, "seqlen": seqlen, "windows": windows, "batch_size": bs, "tokens": tokens,
           "seconds": [x["seconds"] for x in runs], "tokens_per_s": r["tokens_per_s"],
           "eager_tokens_per_s": eager["tokens_per_s"], "eager_fraction_of_floor_rate": (floor_flops / rate) / eager["seconds"],
           "compiled_tokens_per_s": compiled["tokens_per_s"] if compiled else None,
           "compile_seconds": compiled["first_call_seconds_incl_compile"] if compiled else None,
           "sdpa_backend": compiled["sdpa"] if r is compiled else "default",
           "best": "compiled" if r is compiled else "eager", "compiled_seconds_by_backend_batch": tried,
           "floor_flops": floor_flops, "floor_counts": "2 x (block linear + LM head parameters) x tokens",
           "all_parameters": all_params,
           "fraction_of_floor_rate_all_parameters": (2 * all_params * tokens / rate) / r["seconds"],
           "attention_flops_not_in_floor": attention_flops(model.config, seqlen, windows),
           "floor_seconds": floor_flops / rate, "floor_tokens_per_s": tokens / (floor_flops / rate),
           "fraction_of_floor_rate": (floor_flops / rate) / r["seconds"], "target_fraction": 0.70,
           "profile_top_kernels": profile,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}
    print(f"ppl eager {out['eager_fraction_of_floor_rate']:.3f} of floor; best ({out['best']}): {r['tokens_per_s']:.0f} tokens/s, {100 * out['fraction_of_floor_rate']:.1f} % of the floor rate "
          f"(batch {bs}, {r['seconds']:.2f} s for {tokens} tokens)", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out


def bench_select(dev) -> list[dict]:
    """Mask selection kernels on the GPU: torch.topk against a stable sort, at the shapes pruning uses."""
    cases = [("2:4 groups of a 4096x4096 weight", (4096 * 1024, 4), 2, -1),
             ("2:4 groups of an 11008x4096 weight", (11008 * 1024, 4), 2, -1),
             ("per-row half of a 4096x4096 weight", (4096, 4096), 2048, 1),
             ("SparseGPT lazy block, one slice of 11008x128", (11008 * 128,), 11008 * 64, 0)]
    if dev.type != "cuda":
        cases = [(n, tuple(max(1, d // 512) if i == 0 else d for i, d in enumerate(sh)), max(1, k // 512) if len(sh) == 1 else k, dim)
                 for n, sh, k, dim in cases]
    out = []
    for name, shape, k, dim in cases:
        x = torch.rand(shape, device=dev)
        row = {"case": name, "shape": list(shape), "k": k}
        for how in ("topk", "sort"):
            fn = ((lambda: torch.topk(x, k, dim=dim, largest=False, sorted=False).indices) if how == "topk"
                  else (lambda: torch.sort(x, dim=dim, stable=True).indices.narrow(dim, 0, k)))
            fn()
            sync(dev)
            t = time.perf_counter()
            for _ in range(5):
                fn()
            sync(dev)
            row[f"{how}_ms"] = (time.perf_counter() - t) / 5 * 1e3
        print(f"select {name}: topk {row['topk_ms']:.2f} ms, stable sort {row['sort_ms']:.2f} ms", flush=True)
        out.append(row)
    return out


def memory_terms(model, n: int, seqlen: int, batch: int, peak: int | None, dtype_bytes: int = 2,
                 calibrated: bool = True) -> dict:
    """The terms of the peak GPU memory: blocks' weights (up to three on the GPU: one coming, one in use,
    one going back), the calibration activations (one set, outputs replace inputs batch by batch, plus one
    batch of outputs), and the rest (workspace: one batch's intermediate tensors, statistics, masks)."""
    cfg = model.config
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * dtype_bytes
    acts = n * seqlen * cfg.hidden_size * dtype_bytes if calibrated else 0
    out = {"block_weights_bytes": block, "blocks_on_gpu_max": 3, "activations_bytes": acts,
           "one_batch_outputs_bytes": batch * seqlen * cfg.hidden_size * dtype_bytes if calibrated else 0}
    if peak is not None:
        out["workspace_bytes"] = peak - 3 * block - acts - out["one_batch_outputs_bytes"]
    return out


def bench_prune(shape, dev, rate, smoke, methods, patterns, layers=None, in_place_model: bool = False,
                gpu_cap_gib: float | None = None, compile_modes=("auto",), eager_methods=None,
                warm_repeat: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t = time.perf_counter()
    if in_place_model:
        cpu_model = build_on_host(shape, dev, dtype, layers) if dev.type == "cuda" else build(shape, dev, dtype, layers)
    else:
        cpu_model = build(shape, dev, dtype, layers).to("cpu")
    build_s = time.perf_counter() - t
    gc.collect()
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    weights_bytes = sum(p.numel() * p.element_size() for p in cpu_model.parameters())
    gpu_total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    if gpu_cap_gib and dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_cap_gib * 2**30 / gpu_total), dev.index or 0)
    n, seqlen = (128, 2048) if not smoke else (4, 32)
    tokens = torch.randint(0, cpu_model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(0))
    blk, _ = linear_params(cpu_model)
    fwd_flops = 2 * blk * n * seqlen + attention_flops(cpu_model.config, seqlen, n)
    floor = 2 * fwd_flops / rate
    print(f"{shape}: {sum(p.numel() for p in cpu_model.parameters()) / 1e9:.2f} B parameters, "
          f"{weights_bytes / 2**30:.1f} GiB of weights in host memory (built in {build_s:.0f} s); "
          f"GPU {gpu_total / 2**30 if gpu_total else 0:.0f} GiB" + (f", capped at {gpu_cap_gib} GiB" if gpu_cap_gib else ""),
          flush=True)
    results = []
    runs = []
    for method in methods:
        for pattern in patterns:
            for mode in compile_modes:
                if mode == "off" and eager_methods is not None and method not in eager_methods and "on" in compile_modes:
                    continue
                if mode == "on" and method == "magnitude":
                    continue  # no calibration pass to compile
                runs.append((method, pattern, mode))
    if warm_repeat:  # the first compiled run again: its graphs are cached in this process by now
        first = next((r for r in runs if r[2] == "on"), None)
        if first:
            runs.insert(runs.index(first) + 1, first)
    seen_graphs: set = set()
    for method, pattern, mode in runs:
        model = cpu_model if in_place_model else copy.deepcopy(cpu_model)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        cfg = PruneConfig(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None,
                          device=str(dev), compile=mode)
        stats_kind = tuple(SCORERS.get(method).needs)
        t = time.perf_counter()
        rep = prune(model, cfg, tokens)
        sync(dev)
        wall = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        batch = cfg.batch_size or auto_batch_size(tokens)
        row = {"method": method, "pattern": pattern, "layers": cpu_model.config.num_hidden_layers,
               "parameters": sum(p.numel() for p in cpu_model.parameters()), "weights_bytes": weights_bytes,
               "gpu_total_bytes": gpu_total, "gpu_cap_bytes": int(gpu_cap_gib * 2**30) if gpu_cap_gib else None,
               "wall_seconds": wall, "floor_seconds": floor, "ratio_to_floor": wall / floor,
               "timings": rep.timings, "sparsity": rep.sparsity,
               "peak_gpu_bytes": peak, "memory_terms": memory_terms(cpu_model, n, seqlen, batch, peak,
                                                                        calibrated=method != "magnitude"),
               "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "calibration": f"{n} x {seqlen} random token ids", "block_timings_first": rep.block_timings[:2],
               "compile": mode, "compiled": rep.compiled}
        if rep.compiled:
            # the graphs of a statistics kind compile once per process; the first block pays for it
            row["compile_cold"] = stats_kind not in seen_graphs
            seen_graphs.add(stats_kind)
            b0, b1 = rep.block_timings[0], rep.block_timings[1]
            first_s = b0.get("calibrate", 0) + b0.get("propagate", 0) - b1.get("calibrate", 0) - b1.get("propagate", 0)
            row["first_block_extra_seconds"] = first_s
            row["ratio_to_floor_without_first_block_extra"] = (wall - first_s) / floor
        results.append(row)
        gpu = f"{row['peak_gpu_bytes'] / 2**30:.2f} GiB" if row["peak_gpu_bytes"] else "-"
        print(f"prune {method:9s} {pattern:12s} compile {mode:4s}{' (cold)' if row.get('compile_cold') else ''} {wall:7.1f} s = {wall / floor:5.2f} x floor ({floor:.1f} s), "
              f"peak GPU {gpu}, host RSS {row['peak_host_rss_bytes'] / 2**30:.1f} GiB "
              f"[{', '.join(f'{k} {v:.1f}' for k, v in rep.timings.items())}]", flush=True)
        if not in_place_model:
            del model
        gc.collect()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=["ppl", "prune", "select"])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--methods", default="magnitude,wanda,ria,sparsegpt")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--layers", type=int, default=None, help="build only this many blocks (per-block cost is the same)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, for the tests")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    p.add_argument("--tag", default="")
    p.add_argument("--ppl-batches", default="", help="extra batch sizes to try for the compiled perplexity run")
    p.add_argument("--sdpa", default="default", help="SDPA backends to try first, comma-separated: default, cudnn, flash")
    p.add_argument("--profile", action="store_true", help="print and record the top CUDA kernels of one ppl batch")
    p.add_argument("--host-model", action="store_true",
                   help="build the model straight into host memory and prune it in place (one method/pattern "
                        "per model: for shapes whose weights fill most of the host memory)")
    p.add_argument("--gpu-cap-gib", type=float, default=None,
                   help="cap the GPU memory this process may use (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--compile", default="auto", help="compile modes of the calibration passes to run, e.g. off,on")
    p.add_argument("--eager-methods", default="",
                   help="with --compile off,on: the methods that also get an eager (off) row (default: all)")
    p.add_argument("--warm-repeat", action="store_true",
                   help="run the first compiled row twice: cold (compiles) and warm (graphs cached in the process)")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    shape = "tiny" if a.smoke else a.shape
    rates = [matmul_rate(dev) for _ in range(1 if a.smoke else 5)]  # the rate moves ~5 % run to run
    rate = statistics.median(rates)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "bf16_matmul_flops_per_s": rate, "bf16_matmul_flops_per_s_runs": rates,
           "bf16_matmul_rate_spread": (max(rates) - min(rates)) / rate,
           "versions": package_versions(), "torch_cuda": torch.version.cuda}
    print(f"{env['device']}: bf16 matmul {rate / 1e12:.0f} TFLOP/s (median of {len(rates)}, spread "
          f"{100 * env['bf16_matmul_rate_spread']:.1f} %)", flush=True)
    tag = ("smoke_" if a.smoke else "") + (a.tag or "")
    if "ppl" in a.what:
        write_json(Path(a.out) / f"{tag}gpu_ppl_throughput_{shape}.json", {"environment": env, **bench_ppl(shape, dev, rate, a.smoke,
                  extra_batches=[int(x) for x in a.ppl_batches.split(",") if x],
                  backends=a.sdpa.split(","), profile_too=a.profile)})
    if "select" in a.what:
        write_json(Path(a.out) / f"{tag}gpu_mask_selection.json", {"environment": env, "rows": bench_select(dev)})
    if "prune" in a.what:
        rows = bench_prune(shape, dev, rate, a.smoke, a.methods.split(","), a.patterns.split(","), a.layers,
                           in_place_model=a.host_model, gpu_cap_gib=a.gpu_cap_gib,
                           compile_modes=a.compile.split(","),
                           eager_methods=a.eager_methods.split(",") if a.eager_methods else None,
                           warm_repeat=a.warm_repeat)
        write_json(Path(a.out) / f"{tag}gpu_prune_{shape}{'_' + str(a.layers) + 'blocks' if a.layers else ''}.json",
                   {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
