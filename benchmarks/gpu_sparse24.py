"""GPU benchmark of 2:4 acceleration (`llmprune.export.sparse24`) on a random-initialized model at real shapes
(speed does not depend on the values): a Llama-2-7B-shaped LlamaForCausalLM in bf16, every block linear layer
made 2:4 by magnitude, then

* kernel table: each distinct linear shape at M = 1, 8, 32, 2048, 16384 tokens, dense vs both sparse backends
  (kernel-level, eager and CUDA-graph timings, from `accelerate_2of4_`'s own measurement) and the
  `to_sparse_semi_structured` tensor-subclass path for reference;
* prefill latency, 2048 tokens at batch 1 and 8: one forward into an empty DynamicCache (use_cache=True, as
  generation's prefill), logits of the last position only (logits_to_keep=1); eager and one CUDA graph;
* decode latency per token at batch 1 and 32 after a 128-token prompt, greedy: the eager HF loop with a
  DynamicCache, and a StaticCache step captured in a CUDA graph (argmax and position update inside the graph);
* logits check: relative error ||logits_2:4 - logits_dense|| / ||logits_dense|| on a fixed 2048-token input
  (the dense model is the same 2:4-pruned weights run dense) and greedy-token agreement;
* speedups against the targets (prefill >= 1.2x, decode >= 1.0x), peak GPU memory dense vs 2:4.

Dense is timed first, then the same model object is converted in place and timed again.

    python benchmarks/gpu_sparse24.py --shape llama2-7b --out results/   [--layers N] [--smoke: tiny shape on CPU]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.export.sparse24 import (  # noqa: E402
    accelerate_2of4_, cuda_time_ms, is_2of4, set_sparse24_mode, sparse24_layers)
from llmprune.masks import apply_mask_, nm_mask  # noqa: E402
from llmprune.models import find_blocks, linear_layers  # noqa: E402
from llmprune.versions import package_versions  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, max_position_embeddings=256),
}
TARGETS = {"prefill": 1.2, "decode": 1.0}
T0 = time.perf_counter()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


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


def cusparselt_version():
    try:
        return torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def build(shape: str, dev: torch.device, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)  # inference only: no autograd graph keeps activations alive


@torch.no_grad()
def mask_2of4_(model) -> dict:
    """Magnitude 2:4 on every block linear layer, on the weights' device; returns counts."""
    n = 0
    for block in find_blocks(model).modules:
        for layer in linear_layers(block).values():
            w = layer.weight.data  # (out_features, in_features)
            apply_mask_(w, nm_mask(w.abs(), 2, 4))
            n += 1
    ok = all(is_2of4(layer.weight.data) for b in find_blocks(model).modules for layer in linear_layers(b).values())
    return {"pattern": "2:4", "scores": "magnitude |w|", "layers": n, "all_2of4": ok}


class Recorder:
    """Collects results and errors; every variant runs through `attempt`, so one failure is recorded, not fatal."""

    def __init__(self, path: Path, dev: torch.device):
        self.path, self.dev = path, dev
        self.data: dict = {"errors": []}

    def save(self) -> None:
        self.data["elapsed_seconds"] = time.perf_counter() - T0
        write_json(self.path, self.data)

    def attempt(self, label: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the benchmark goes on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            msg = f"{label}: {type(e).__name__}: {first}"[:500]
            say(f"  ! {msg}")
            self.data["errors"].append({"where": label, "error": msg,
                                        "trace": traceback.format_exc(limit=6)[-2000:]})
            gc.collect()
            if self.dev.type == "cuda":
                try:
                    torch.cuda.synchronize(self.dev)
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass
            return None


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


def stats_ms(seconds: list[float], per: int = 1) -> dict:
    ms = [1e3 * s / per for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs_ms": ms}


def new_dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def new_static_cache(model, batch: int, max_len: int, dev, dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=dev, dtype=dtype)


def prefill_call(model, ids, cache: bool = True):
    if not cache:
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    return model(input_ids=ids, past_key_values=new_dynamic_cache(model), use_cache=True, logits_to_keep=1).logits


def capture(fn, dev, warmup: int = 2):
    """A CUDA graph of `fn()` (warmed up on a side stream first) and the output tensor it writes."""
    stream = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    stream.wait_stream(side)
    sync(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    sync(dev)
    return g, out


@torch.no_grad()
def bench_prefill(model, ids, dev, warmup: int, runs: int, graph: bool) -> dict:
    if not graph:
        return stats_ms(time_runs(lambda: prefill_call(model, ids), dev, warmup, runs))
    static, protocol = ids.clone(), "DynamicCache"
    try:
        g, _ = capture(lambda: prefill_call(model, static), dev)
    except Exception as e:  # noqa: BLE001 - e.g. the cache's lazy set-up refused under capture: capture without a cache
        # (transformers then builds an explicit causal mask while capturing, so attention leaves the flash kernel)
        protocol = f"use_cache=False (DynamicCache capture failed: {type(e).__name__})"
        torch.cuda.synchronize(dev)
        g, _ = capture(lambda: prefill_call(model, static, cache=False), dev)
    try:
        return {**stats_ms(time_runs(g.replay, dev, warmup, runs)), "protocol": protocol}
    finally:
        del g
        torch.cuda.empty_cache()


@torch.no_grad()
def decode_eager_once(model, prompt, new_tokens: int, dev) -> tuple[float, torch.Tensor]:
    """Greedy decode with a DynamicCache; (seconds for the `new_tokens` steps, tokens (batch, new_tokens))."""
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    toks = []
    sync(dev)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
    sync(dev)
    return time.perf_counter() - t, torch.cat(toks, 1)


@torch.no_grad()
def bench_decode_eager(model, prompt, new_tokens: int, dev, runs: int) -> dict:
    decode_eager_once(model, prompt, min(4, new_tokens), dev)  # warm-up
    secs, toks = [], None
    for _ in range(runs):
        s, toks = decode_eager_once(model, prompt, new_tokens, dev)
        secs.append(s)
    return {**stats_ms(secs, per=new_tokens), "tokens": toks.tolist()}


@torch.no_grad()
def bench_decode_static(model, prompt, new_tokens: int, dev, runs: int, graph: bool) -> dict:
    """Greedy decode with a StaticCache; one step (forward, argmax, position + 1) replayed from a CUDA graph
    (graph=True) or run eagerly (graph=False: the same code path, e.g. on the CPU)."""
    batch, plen = prompt.shape
    dtype = next(model.parameters()).dtype
    cache = new_static_cache(model, batch, plen + new_tokens + 8, dev, dtype)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(plen, device=dev), use_cache=True)
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    ids, pos = first.clone(), torch.tensor([plen], device=dev)

    def step():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def reset():  # back to "prompt cached, first token next"; the prompt's keys/values stay in place
        ids.copy_(first)
        pos.fill_(plen)
        for c in counters:  # transformers >= 5.x static layers track their write position in a tensor
            c.fill_(plen)

    g = None
    if graph:
        g, _ = capture(step, dev)
        run_step = g.replay
    else:
        run_step = step
    try:
        reset()
        toks = []
        for _ in range(new_tokens):
            toks.append(ids.clone())
            run_step()
        tokens = torch.cat(toks, 1)[:, 1:]  # the inputs of steps 2..N are the outputs of steps 1..N-1

        def one_run():
            reset()
            for _ in range(new_tokens):
                run_step()
        secs = time_runs(one_run, dev, 1, runs)
        return {**stats_ms(secs, per=new_tokens), "tokens": tokens.tolist()}
    finally:
        del g
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def agreement(a, b) -> dict | None:
    if a is None or b is None:
        return None
    ta, tb = torch.tensor(a), torch.tensor(b)
    n = min(ta.shape[1], tb.shape[1])
    eq = ta[:, :n] == tb[:, :n]
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else n for row in eq]
    return {"equal_fraction": float(eq.float().mean()), "tokens_until_first_difference": first}


def sparse_layers_at(model, tokens: int) -> int:
    """How many Sparse24Linear layers run the sparse kernel at this token count in their current mode."""
    return sum(1 for m in sparse24_layers(model).values() if tokens * m.in_features >= m._dense_numel)


@torch.no_grad()
def logits_check(model, ids, ref: torch.Tensor) -> dict:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    rel = float((logits - ref).norm() / ref.norm())
    top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"rel_error": rel, "top1_agreement": top1, "sparse_layers": sparse_layers_at(model, ids.numel())}


@torch.no_grad()
def subclass_timings(model, token_counts, dev) -> dict:
    """The tensor-subclass path (`to_sparse_semi_structured` + F.linear), eager, per shape and M (reference)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    seen, out = set(), {}
    for block in find_blocks(model).modules:
        for layer in linear_layers(block).values():
            key = tuple(layer.weight.shape)
            if key in seen:
                continue
            seen.add(key)
            for backend, force in (("cusparselt", False), ("cutlass", True)):
                prev = SparseSemiStructuredTensor._FORCE_CUTLASS
                row = []
                try:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = force
                    ws = to_sparse_semi_structured(layer.weight.data)
                    for m in token_counts:
                        x = torch.randn(m, key[1], device=dev, dtype=layer.weight.dtype)
                        row.append(cuda_time_ms(lambda: torch.nn.functional.linear(x, ws), warmup=2, iters=10,
                                                repeats=3))
                except Exception as e:  # noqa: BLE001
                    row = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                finally:
                    SparseSemiStructuredTensor._FORCE_CUTLASS = prev
                out.setdefault(f"{key[0]}x{key[1]}", {})[backend] = row
    return out


def kernel_table(report: dict, subclass: dict | None) -> list[dict]:
    rows = []
    for s in report.get("shapes", []):
        name = f"{s['shape'][0]}x{s['shape'][1]}"
        for i, m in enumerate(s.get("token_counts", [])):
            row = {"shape": name, "M": m, "decision": s.get("decision"), "backend": s.get("backend"),
                   "dense_below": s.get("dense_below")}
            for mode, v in (s.get("dense_ms") or {}).items():
                row[f"dense_{mode}_ms"] = v[i]
            for backend, per_mode in (s.get("sparse_ms") or {}).items():
                for mode, v in per_mode.items():
                    row[f"{backend}_{mode}_ms"] = v[i]
            sub = (subclass or {}).get(name) or {}
            for backend, v in sub.items():
                row[f"subclass_{backend}_eager_ms"] = v[i] if isinstance(v, list) else None
            rows.append(row)
    return rows


def speedups(dense: dict, sparse: dict) -> dict:
    """Per-mode speedups (dense / 2:4, same mode) and the best-vs-best one."""
    out = {}
    for mode in ("eager", "graph"):
        d, s = (dense.get(mode) or {}).get("median_ms"), (sparse.get(mode) or {}).get("median_ms")
        out[mode] = d / s if d and s else None
    bd = [v["median_ms"] for v in dense.values() if isinstance(v, dict) and v.get("median_ms")]
    bs = [v["median_ms"] for v in sparse.values() if isinstance(v, dict) and v.get("median_ms")]
    out["best"] = min(bd) / min(bs) if bd and bs else None
    return out


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def print_summary(data: dict) -> None:
    print("\n== 2:4 acceleration: " + f"{data['config']['shape']} ({data['config']['layers']} blocks), "
          f"{data['environment']['device']} ==", flush=True)
    conv = data.get("conversion") or {}
    L = conv.get("layers", {})
    print(f"conversion: {conv.get('status')} ({conv.get('reason') or 'ok'}); {L.get('replaced', 0)}/{L.get('total', 0)} "
          f"layers replaced, {L.get('dispatching', 0)} dispatching with a dense copy; "
          f"cslt api {conv.get('cslt_api')}, search {conv.get('search_api')}")
    rows = data.get("kernels") or []
    if rows:
        print("\nkernels, ms per call (eager|graph); subclass = to_sparse_semi_structured + F.linear (eager); "
              "runs = what the converted layer runs at this M (eager|graph, D dense / S sparse)")
        print(f"{'shape':<11}{'M':>6}  {'dense':>13}  {'cusparselt':>13}  {'cutlass':>13}  {'subclass':>8}  runs  decision")
        for r in rows:
            cell = lambda k: f"{fmt(r.get(k + '_eager_ms'), '.3f')}|{fmt(r.get(k + '_graph_ms'), '.3f')}"  # noqa: E731
            thr = r.get("dense_below") or {}

            def runs(mode):
                if r["decision"] == "sparse":
                    return "S"
                t = thr.get(mode, thr.get("eager"))
                return "S" if r["decision"] == "dispatch" and t is not None and r["M"] >= t else "D"
            print(f"{r['shape']:<11}{r['M']:>6}  {cell('dense'):>13}  {cell('cusparselt'):>13}  {cell('cutlass'):>13}  "
                  f"{fmt(r.get('subclass_cusparselt_eager_ms'), '.3f'):>8}  {runs('eager')}|{runs('graph')}   "
                  f"{r['decision']} {r.get('backend') or ''}")
    print(f"\n{'end to end':<24}{'dense eager':>12}{'dense graph':>12}{'2:4 eager':>11}{'2:4 graph':>11}"
          f"{'speedup':>9}{'target':>8}  pass")
    for phase in ("prefill", "decode"):
        for key, row in (data.get(phase) or {}).items():
            d, s, sp = row.get("dense", {}), row.get("sparse", {}), row.get("speedup", {})
            unit = "ms" if phase == "prefill" else "ms/token"
            print(f"{phase + ' ' + key + ' (' + unit + ')':<24}{fmt((d.get('eager') or {}).get('median_ms')):>12}"
                  f"{fmt((d.get('graph') or {}).get('median_ms')):>12}{fmt((s.get('eager') or {}).get('median_ms')):>11}"
                  f"{fmt((s.get('graph') or {}).get('median_ms')):>11}{fmt(sp.get('best'), '.3f'):>9}"
                  f"{TARGETS[phase]:>8.2f}  {row.get('pass')}")
    acc = data.get("accuracy") or {}
    parts = [f"{k}: rel {fmt((v or {}).get('rel_error'), '.2e')}, top-1 {fmt((v or {}).get('top1_agreement'), '.3f')}, "
             f"{(v or {}).get('sparse_layers')} sparse layers" for k, v in (acc.get("logits") or {}).items()]
    print("\nlogits vs dense: " + ("; ".join(parts) or "-"))
    g = acc.get("greedy_b1_all_sparse") or {}
    print(f"greedy decode b1, every layer sparse vs dense: equal fraction {fmt(g.get('equal_fraction'), '.3f')}")
    mem = data.get("memory") or {}
    gib = lambda b: fmt(b / 2**30 if b else None, ".2f")  # noqa: E731
    print(f"memory GiB: weights dense {gib(mem.get('allocated_dense_bytes'))} -> 2:4 {gib(mem.get('allocated_sparse_bytes'))}; "
          f"peak dense {gib(mem.get('peak_dense_bytes'))}, peak 2:4 {gib(mem.get('peak_sparse_bytes'))}")
    t = data.get("targets") or {}
    print(f"targets: prefill >= {TARGETS['prefill']}x: {t.get('prefill_pass')}; decode >= {TARGETS['decode']}x "
          f"(every mode): {t.get('decode_pass')} (within noise: {t.get('decode_pass_within_noise')}); "
          f"errors: {len(data.get('errors', []))}; "
          f"total {data.get('elapsed_seconds', 0):.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="build only this many blocks")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, for the tests")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    p.add_argument("--tag", default="")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--prefill-batches", default="1,8")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--kernel-tokens", default="1,8,32,2048,16384", help="token counts of the kernel table/decisions")
    p.add_argument("--policy", default="dispatch", choices=["dispatch", "sparse-only", "always"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variants")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip optional variants once this much time has passed")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    shape = "tiny" if a.smoke else a.shape
    if a.smoke:
        a.prefill_tokens, a.prompt_tokens, a.new_tokens, a.runs, a.warmup = 32, 8, 4, 2, 1
    dtype = torch.bfloat16  # on the CPU too (smoke), so the layers are eligible and the fallback is "no CUDA"
    graphs = dev.type == "cuda" and not a.no_graphs
    tag = ("smoke_" if a.smoke else "") + (a.tag or "")
    path = Path(a.out) / f"{tag}gpu_sparse24_{shape}{'_' + str(a.layers) + 'blocks' if a.layers else ''}.json"
    rec = Recorder(path, dev)
    data = rec.data
    prefill_batches = [int(x) for x in a.prefill_batches.split(",") if x]
    decode_batches = [int(x) for x in a.decode_batches.split(",") if x]
    kernel_tokens = [int(x) for x in a.kernel_tokens.split(",") if x]

    rate = matmul_rate(dev)
    data["environment"] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "capability": list(torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else None,
                           "bf16_matmul_flops_per_s": rate, "versions": package_versions(), "torch_cuda": torch.version.cuda,
                           "cusparselt": cusparselt_version() if dev.type == "cuda" else None}
    say(f"{data['environment']['device']}: bf16 matmul {rate / 1e12:.0f} TFLOP/s; writing {path}")
    model = build(shape, dev, dtype, a.layers)
    cfg = model.config
    data["config"] = {"shape": shape, "layers": cfg.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
                      "prefill_tokens": a.prefill_tokens, "prefill_batches": prefill_batches,
                      "prefill_protocol": "one forward into an empty DynamicCache (use_cache=True), logits_to_keep=1",
                      "decode_batches": decode_batches, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                      "decode_protocol": "greedy; eager: HF loop with DynamicCache; graph: StaticCache step "
                                         "(forward + argmax + position update) replayed from one CUDA graph",
                      "kernel_tokens": kernel_tokens, "policy": a.policy, "runs": a.runs, "warmup": a.warmup,
                      "graphs": graphs, "targets": TARGETS, "model": "random-initialized LlamaForCausalLM (sdpa)"}
    data["mask"] = mask_2of4_(model)
    say(f"built {shape} x {cfg.num_hidden_layers} blocks in {data['config']['dtype']}, 2:4 magnitude mask on "
        f"{data['mask']['layers']} layers (all 2:4: {data['mask']['all_2of4']})")
    mem = data["memory"] = {}
    if dev.type == "cuda":
        mem["allocated_dense_bytes"] = torch.cuda.memory_allocated(dev)
    rec.save()

    g = torch.Generator().manual_seed(0)
    prefill_ids = {b: torch.randint(0, cfg.vocab_size, (b, a.prefill_tokens), generator=g).to(dev) for b in prefill_batches}
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, a.prompt_tokens), generator=g).to(dev) for b in decode_batches}
    check_ids = prefill_ids[prefill_batches[0]][:1]

    def over_budget(what: str) -> bool:
        if time.perf_counter() - T0 > a.budget_s:
            say(f"  skipped {what}: past the {a.budget_s:.0f} s budget")
            data["errors"].append({"where": what, "error": "skipped: time budget"})
            return True
        return False

    def run_phase(variant: str) -> None:
        """All end-to-end timings of the model in its current state ("dense" or "sparse")."""
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for b in prefill_batches:
            row = data.setdefault("prefill", {}).setdefault(f"b{b}", {}).setdefault(variant, {})
            if variant == "sparse":
                set_sparse24_mode(model, "eager")
                row["sparse_layers_eager"] = sparse_layers_at(model, b * a.prefill_tokens)
            say(f"{variant} prefill {a.prefill_tokens} x b{b}: eager")
            row["eager"] = rec.attempt(f"{variant} prefill b{b} eager", bench_prefill, model, prefill_ids[b], dev,
                                       a.warmup, a.runs, False)
            if graphs and not over_budget(f"{variant} prefill b{b} graph"):
                say(f"{variant} prefill {a.prefill_tokens} x b{b}: CUDA graph")
                if variant == "sparse":
                    set_sparse24_mode(model, "graph")
                    row["sparse_layers_graph"] = sparse_layers_at(model, b * a.prefill_tokens)
                row["graph"] = rec.attempt(f"{variant} prefill b{b} graph", bench_prefill, model, prefill_ids[b], dev,
                                           a.warmup, a.runs, True)
                set_sparse24_mode(model, "eager")
            rec.save()
        for b in decode_batches:
            row = data.setdefault("decode", {}).setdefault(f"b{b}", {}).setdefault(variant, {})
            set_sparse24_mode(model, "eager")
            row["sparse_layers_eager"] = sparse_layers_at(model, b) if variant == "sparse" else None
            say(f"{variant} decode b{b}: eager ({a.new_tokens} tokens after {a.prompt_tokens})")
            row["eager"] = rec.attempt(f"{variant} decode b{b} eager", bench_decode_eager, model, prompts[b],
                                       a.new_tokens, dev, max(a.runs - 2, 1))
            if not over_budget(f"{variant} decode b{b} static"):
                kind = "graph" if graphs else "static_eager"
                say(f"{variant} decode b{b}: StaticCache {'CUDA graph' if graphs else 'eager'}")
                if variant == "sparse" and graphs:
                    set_sparse24_mode(model, "graph")
                    row["sparse_layers_graph"] = sparse_layers_at(model, b)
                row[kind] = rec.attempt(f"{variant} decode b{b} {kind}", bench_decode_static, model, prompts[b],
                                        a.new_tokens, dev, max(a.runs - 2, 1), graphs)
                set_sparse24_mode(model, "eager")
                if row.get("eager") and row.get(kind):
                    row[f"{kind}_tokens_match_eager"] = agreement(row["eager"]["tokens"], row[kind]["tokens"])
            rec.save()
        if dev.type == "cuda":
            mem[f"peak_{variant}_bytes"] = torch.cuda.max_memory_allocated(dev)

    # ---------------------------------------------------------------- dense
    ref_logits = rec.attempt("dense logits", lambda: model(input_ids=check_ids, use_cache=False).logits.float())
    run_phase("dense")

    # ---------------------------------------------------------------- convert
    if not over_budget("subclass kernel timings") and dev.type == "cuda":
        say("tensor-subclass reference timings (to_sparse_semi_structured + F.linear, eager)")
        data["subclass_kernels"] = rec.attempt("subclass timings", subclass_timings, model, kernel_tokens, dev)
    say(f"accelerate_2of4_(policy={a.policy}, token_counts={kernel_tokens})")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    data["conversion"] = rec.attempt("conversion", accelerate_2of4_, model, token_counts=kernel_tokens, policy=a.policy)
    conv = data["conversion"] or {}
    say(f"conversion: {conv.get('status')} ({conv.get('reason') or 'ok'}), "
        f"{(conv.get('layers') or {}).get('replaced', 0)} layers replaced in {fmt(conv.get('seconds'), '.1f')} s")
    data["kernels"] = kernel_table(conv, data.get("subclass_kernels"))
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        mem["peak_conversion_bytes"] = torch.cuda.max_memory_allocated(dev)
        mem["allocated_sparse_bytes"] = torch.cuda.memory_allocated(dev)
    mem["conversion"] = conv.get("memory")
    rec.save()

    # ---------------------------------------------------------------- 2:4
    run_phase("sparse")
    acc = data["accuracy"] = {"note": "random-initialized weights give near-tied logits, so token agreement is a weak "
                                      "signal; the relative error of the logits is the check"}
    if ref_logits is not None:
        acc["logits"] = {}
        for mode in ("graph", "eager", "sparse"):
            set_sparse24_mode(model, mode)
            acc["logits"][f"mode_{mode}"] = rec.attempt(f"logits check ({mode})", logits_check, model, check_ids, ref_logits)
        set_sparse24_mode(model, "eager")
        del ref_logits
    dense_tokens = ((data["decode"].get(f"b{decode_batches[0]}") or {}).get("dense") or {}).get("eager") or {}
    set_sparse24_mode(model, "sparse")
    forced = rec.attempt("greedy decode all sparse", bench_decode_eager, model, prompts[decode_batches[0]],
                         a.new_tokens, dev, 1)
    set_sparse24_mode(model, "eager")
    acc["greedy_b1_all_sparse"] = agreement(dense_tokens.get("tokens"), (forced or {}).get("tokens"))

    # ---------------------------------------------------------------- summary
    for phase in ("prefill", "decode"):
        for row in (data.get(phase) or {}).values():
            row["speedup"] = speedups(row.get("dense", {}), row.get("sparse", {}))
            target = TARGETS[phase]
            if phase == "prefill":  # the best 2:4 variant against the best dense one
                row["pass"] = None if row["speedup"]["best"] is None else row["speedup"]["best"] >= target
            else:  # never slower: in every mode measured for both
                same = {k: v for k, v in row["speedup"].items() if k != "best" and v is not None}
                row["pass"] = None if not same else all(v >= target for v in same.values())
                # run-to-run spread of the dense timings, (max - min) / 2 / median, as a noise yardstick
                spread = {k: ((row["dense"][k]["max_ms"] - row["dense"][k]["min_ms"]) / 2 / row["dense"][k]["median_ms"])
                          for k in same if (row["dense"].get(k) or {}).get("median_ms")}
                row["dense_spread"] = spread
                row["pass_within_noise"] = None if not same else all(
                    v >= target * (1 - spread.get(k, 0.0)) for k, v in same.items())
    flags = {ph: [r.get("pass") for r in (data.get(ph) or {}).values()] for ph in ("prefill", "decode")}
    data["targets"] = {"prefill_min_speedup": TARGETS["prefill"], "decode_min_speedup": TARGETS["decode"],
                       "prefill_pass": all(f is True for f in flags["prefill"]) if flags["prefill"] else None,
                       "decode_pass": all(f is True for f in flags["decode"]) if flags["decode"] else None,
                       "decode_pass_within_noise": (all(r.get("pass_within_noise") is True
                                                        for r in (data.get("decode") or {}).values())
                                                    if data.get("decode") else None),
                       "note": "prefill: best 2:4 variant vs best dense variant; decode: every mode (eager, graph) "
                               "2:4 vs dense in the same mode; within_noise allows the dense runs' half-range"}
    rec.save()
    print_summary(data)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s", stream=sys.stdout)
    raise SystemExit(main())
