"""Design probe for issue 12 item 4: can the calibration statistics pass run at the speed of a compiled block?

One Llama decoder block at a real shape (bf16, random weights), the calibration set of the prune benchmark
(128 windows x 2048 tokens in batches of 8), and these variants of one pass over it:

* eager: the block's plain forward; eager+hooks: with llmprune's `observe` (sqnorm, the Wanda statistic);
* compiled: `block.compile()`; compiled+hooks: the same with one module-level pre-hook function on every linear
  layer that adds the float32 sum of squares of its input to a buffer on that layer (traceable: dynamo inlines
  it, so the accumulation fuses into the compiled graph);
* the Hessian (SparseGPT) eager with `observe`, and compiled with a pre-hook that keeps each input for an
  eager `torch.mm(..., out_dtype=float32)` update after the forward.

Every time is the median of repeated runs, against the FLOP floor of one pass (2 x block linear parameters x
tokens + causal attention) at the bf16 matmul rate measured in the same run (several repetitions, spread
reported). Also checks that the compiled statistics equal the eager ones and how many compilations serve three
blocks. Writes benchmarks/results/gpu_stats_compile_<shape>.json.

    python benchmarks/gpu_stats_compile.py --shape llama2-7b   [--smoke: tiny shape on CPU]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build, matmul_rate, sync, time_runs, write_json  # noqa: E402
from llmprune.calibration.observe import _hessian_update, observe  # noqa: E402
from llmprune.versions import package_versions  # noqa: E402


def _sq_hook(module, args):
    """Traceable statistic: sum over tokens of x^2 per input feature, in float32, into module._sq."""
    x = args[0]
    module._sq.add_(x.float().square().sum(dim=tuple(range(x.dim() - 1))))


_KEPT: list = []  # (module, input) pairs of the current forward


def _h_hook(module, args):
    """Traceable Hessian: X^T X in float32 from the half-precision input (exact products, float32 sums)."""
    x = args[0]
    x2 = x.reshape(-1, x.shape[-1])
    module._h.add_(torch.mm(x2.t(), x2, out_dtype=torch.float32))


def _keep_hook(module, args):
    _KEPT.append((module, args[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    dev = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shape = "tiny" if a.smoke else a.shape
    if a.smoke:
        a.windows, a.seqlen, a.batch, a.reps = 4, 32, 2, 1
    model = build(shape, dev, dtype, layers=3)
    cfg = model.config
    blocks = model.model.layers
    nb = a.windows // a.batch
    torch.manual_seed(0)
    xs = [torch.randn(a.batch, a.seqlen, cfg.hidden_size, device=dev, dtype=dtype) for _ in range(2)]
    pos = torch.arange(a.seqlen, device=dev)[None]
    pe = model.model.rotary_emb(xs[0], pos)

    def run(block, n=nb):
        for i in range(n):
            block(xs[i % 2], attention_mask=None, position_embeddings=pe)

    rates = [matmul_rate(dev) for _ in range(5)]
    rate = statistics.median(rates)
    block_params = sum(m.weight.numel() for m in blocks[0].modules() if isinstance(m, nn.Linear))
    tokens = a.windows * a.seqlen
    attn = 2 * 2 * a.seqlen**2 * cfg.hidden_size * a.windows / 2  # causal half
    floor = (2 * block_params * tokens + attn) / rate
    res: dict = {"shape": shape, "windows": a.windows, "seqlen": a.seqlen, "batch": a.batch,
                 "matmul_rate_tflops": [r / 1e12 for r in rates], "rate_median_tflops": rate / 1e12,
                 "rate_spread": (max(rates) - min(rates)) / rate, "floor_one_pass_s": floor, "variants": {},
                 "versions": package_versions(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    b0 = blocks[0]
    linears = {n: m for n, m in b0.named_modules() if isinstance(m, nn.Linear)}

    def failed(name, e):  # a probe: record why a variant fails, and go on with the others
        res["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name} failed:", e, flush=True)

    def record(name, times, extra=None):
        med = statistics.median(times)
        res["variants"][name] = {"seconds": times, "median_s": med, "x_floor": med / floor, **(extra or {})}
        print(f"{name:28s} {med:8.3f} s  {med / floor:5.2f}x floor", flush=True)

    with torch.no_grad():
        run(b0, 2)
        record("eager", time_runs(lambda: run(b0), dev, 0, a.reps))

        def eager_hooks(need):
            with observe(b0, linears, need) as st:
                run(b0)
            return st

        eager_hooks("sqnorm")
        record("eager+hooks sqnorm", time_runs(lambda: eager_hooks("sqnorm"), dev, 0, a.reps))
        ref = eager_hooks("sqnorm")
        record("eager+hooks hessian", time_runs(lambda: eager_hooks("hessian"), dev, 0, a.reps))

        # compiled, no statistics
        for blk in blocks:
            blk.compile(dynamic=False)
        t = time.perf_counter()
        run(b0, 1)
        sync(dev)
        compile_s = time.perf_counter() - t
        record("compiled", time_runs(lambda: run(b0), dev, 0, a.reps), {"first_call_s": compile_s})
        for blk in blocks:
            blk._compiled_call_impl = None

        # compiled with traceable sqnorm hooks (a fresh dynamo cache: hooks added later are not guarded on)
        torch._dynamo.reset()
        handles = []
        for blk in blocks:
            for m in blk.modules():
                if isinstance(m, nn.Linear):
                    m._sq = torch.zeros(m.in_features, dtype=torch.float32, device=dev)
                    handles.append(m.register_forward_pre_hook(_sq_hook))
            blk.compile(dynamic=False)
        try:
            import torch._dynamo as dynamo

            dynamo.utils.counters.clear()
            t = time.perf_counter()
            run(b0, 1)
            sync(dev)
            first = time.perf_counter() - t
            t = time.perf_counter()
            run(blocks[1], 1)
            run(blocks[2], 1)
            sync(dev)
            others = time.perf_counter() - t
            frames = dict(dynamo.utils.counters.get("stats", {}))
            for m in linears.values():
                m._sq.zero_()
            run(b0)
            sync(dev)
            err = max(float((linears[n]._sq - ref[n].sqnorm).abs().max() / ref[n].sqnorm.abs().max())
                      for n in ref)
            record("compiled+hooks sqnorm", time_runs(lambda: run(b0), dev, 0, a.reps),
                   {"first_call_s": first, "blocks_2_and_3_first_call_s": others, "dynamo_stats": frames,
                    "max_rel_err_vs_eager": err})
        except Exception as e:  # noqa: BLE001
            failed("compiled+hooks sqnorm", e)
        finally:
            for h in handles:
                h.remove()
            for blk in blocks:
                blk._compiled_call_impl = None

        # compiled forward keeping the linear inputs; Hessian updated eagerly from them
        torch._dynamo.reset()
        handles = [m.register_forward_pre_hook(_keep_hook) for m in linears.values()]
        b0.compile(dynamic=False)
        hs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=dev) for n, m in linears.items()}

        names = {id(m): n for n, m in linears.items()}

        def compiled_hessian():
            for i in range(nb):
                b0(xs[i % 2], attention_mask=None, position_embeddings=pe)
                if len(_KEPT) != len(linears):
                    raise RuntimeError(f"{len(_KEPT)} inputs kept for {len(linears)} layers")
                seen = []
                for m, x in _KEPT:
                    if any(x is y for y in seen):  # q/k/v and gate/up read one tensor
                        continue
                    seen.append(x)
                    _hessian_update(hs[names[id(m)]], x.reshape(-1, x.shape[-1]))
                _KEPT.clear()

        try:
            compiled_hessian()
            record("compiled+keep hessian", time_runs(compiled_hessian, dev, 0, a.reps))
        except Exception as e:  # noqa: BLE001
            failed("compiled+keep hessian", e)
        finally:
            for h in handles:
                h.remove()
            b0._compiled_call_impl = None
        # compiled with the Hessian accumulated inside the graph
        torch._dynamo.reset()
        handles = []
        for m in linears.values():
            m._h = torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=dev)
            handles.append(m.register_forward_pre_hook(_h_hook))
        b0.compile(dynamic=False)
        try:
            run(b0, 1)
            record("compiled+hooks hessian", time_runs(lambda: run(b0), dev, 0, a.reps))
        except Exception as e:  # noqa: BLE001
            failed("compiled+hooks hessian", e)
        finally:
            for h in handles:
                h.remove()
            for m in linears.values():
                del m._h
            b0._compiled_call_impl = None

        # Wanda masks from the compiled statistics against the eager ones (per row, 50 %)
        agree, total = 0, 0
        for n, m in linears.items():
            w = m.weight.float().abs()
            k = w.shape[1] // 2
            masks = []
            for sq in (ref[n].sqnorm, linears[n]._sq):  # several passes summed: a scale, same ranking
                score = w * sq.sqrt()[None]
                masks.append(torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, 1, largest=False).indices, True))
            agree += int((masks[0] == masks[1]).sum())
            total += masks[0].numel()
        res["wanda_mask_agreement_compiled_vs_eager"] = agree / total
        print(f"Wanda 50 % masks, compiled vs eager statistics: {100 * agree / total:.4f} % of weights agree", flush=True)
    res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    write_json(Path(a.out) / f"{'smoke_' if a.smoke else ''}gpu_stats_compile_{shape}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
