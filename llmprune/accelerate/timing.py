"""The timing harness: dense `F.linear` against each 2:4 backend for one weight, at the workload's token counts,
with CUDA events, launched eagerly and replayed from a CUDA graph; and the cuSPARSELt plan kept per token count.

* Median of `repeats` CUDA-event timings of `iters` back-to-back calls after a warm-up, in two modes: "eager"
  (calls launched from Python: the host cost counts) and "graph" (the same calls replayed from a CUDA graph:
  kernel time only).
* The loop cycles through enough copies of the weight that they overflow the L2 cache, as a model's layers do
  (one 4096x4096 bf16 weight reused back to back would stay in H100's 50 MB L2 and flatter the smaller
  compressed one).
* For cuSPARSELt the algorithm search runs at each M; the fastest of the default plan, the found one and those
  found at the other token counts (by kernel time, graph-replayed) is kept for that M.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from .backends import _constraints
from .layer import TIMING_MODES
from .ops import DEFAULT_PLAN, compress_2of4, cslt_search, padded_tokens, sparse_mm_2d


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20, repeats: int = 5,
                 graph: bool = False) -> float:
    """Median over `repeats` of the mean time per call of `iters` back-to-back calls (CUDA events).

    graph=True: the `iters` calls are captured once in a CUDA graph and replayed, so host time is excluded."""
    stream = torch.cuda.current_stream()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        stream.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        run = g.replay
        run()
    else:
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(iters):
                fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    if graph:
        del g
    return statistics.median(times)


def _weight_copies(weight: torch.Tensor, max_copies: int = 16) -> int:
    """How many copies of a weight to cycle through so the timed working set is >= 4x the L2 cache (a decode step
    streams every layer's weight from memory; one weight reused back to back would stay in L2)."""
    try:
        l2 = int(torch.cuda.get_device_properties(weight.device).L2_cache_size)
    except Exception:  # noqa: BLE001
        l2 = 50 * 2**20
    nbytes = weight.numel() * weight.element_size()
    return max(2, min(max_copies, math.ceil(4 * l2 / max(nbytes, 1))))


def _cycle(fns: list[Callable[[], object]]) -> Callable[[], object]:
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@torch.no_grad()
def measure_shape(weight: torch.Tensor, bias: torch.Tensor | None, token_counts, backends, *,
                  modes=TIMING_MODES, warmup: int = 3, iters: int = 20, repeats: int = 5, search: bool = True,
                  verify_tol: float = 2e-2) -> dict:
    """Dense `F.linear` against each backend's sparse kernel for one 2:4 weight at each token count.

    Each timed loop cycles through `weight_copies` copies of the weight (working set >= 4x L2), as a model does.
    Returns {"dense_ms": {mode: [...]}, "sparse_ms": {backend: {mode: [...]}}, "plans": {backend: {padded M:
    plan}}, "search_api", "errors": {backend: [...]}, "rel_err": {backend: x}, "weight_copies"}; a failed point
    is None."""
    dev, dtype = weight.device, weight.dtype
    out_f, in_f = weight.shape
    counts = list(token_counts)
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = {m: torch.randn(m, in_f, device=dev, dtype=dtype, generator=gen) for m in counts}
    n_copies = _weight_copies(weight)
    weights = [weight] + [weight.clone() for _ in range(n_copies - 1)]
    res = {"dense_ms": {}, "sparse_ms": {}, "plans": {}, "search_api": None, "errors": {}, "rel_err": {},
           "weight_copies": n_copies}
    for mode in modes:
        row = []
        for m in counts:
            try:
                fn = _cycle([lambda x=xs[m], w=w: F.linear(x, w, bias) for w in weights])
                row.append(cuda_time_ms(fn, warmup=warmup, iters=iters, repeats=repeats, graph=mode == "graph"))
            except Exception as e:  # noqa: BLE001 - recorded, the mode is then left out of the decision
                res["errors"].setdefault("dense", []).append(f"{mode} M={m}: {_err(e)}")
                row.append(None)
        res["dense_ms"][mode] = row
    for backend in backends:
        errs = res["errors"].setdefault(backend, [])
        res["sparse_ms"][backend] = {mode: [None] * len(counts) for mode in modes}
        plans = res["plans"].setdefault(backend, {})
        try:
            packs = [compress_2of4(w, backend) for w in weights]
            packed, meta = packs[0]
            pad_to = _constraints(backend, dtype)[2]
            x = xs[counts[0]]
            ref = F.linear(x, weight, bias)
            y = sparse_mm_2d(x, packed, meta, bias, out_f, backend, DEFAULT_PLAN, pad_to)
            res["rel_err"][backend] = _rel_err(y, ref)
            if not res["rel_err"][backend] <= verify_tol:
                raise RuntimeError(f"relative error {res['rel_err'][backend]:.2e} > {verify_tol:g} against dense")
        except Exception as e:  # noqa: BLE001 - this backend is out for this shape
            errs.append(f"setup: {_err(e)}")
            continue
        for i, m in enumerate(counts):
            x = xs[m]
            m_pad = padded_tokens(m, pad_to)
            plan = DEFAULT_PLAN

            def call(p, copies):  # one call per compressed copy in turn, with plan p
                return _cycle([lambda pk=pk, mt=mt: sparse_mm_2d(x, pk, mt, bias, out_f, backend, p, pad_to)
                               for pk, mt in copies])
            # Plans are compared by kernel time (graph replay) where graphs are measured: an eager call's
            # ~0.4 ms of host-side set-up would drown the difference between algorithms.
            by_graph = "graph" in modes
            candidates = [DEFAULT_PLAN]
            if backend == "cusparselt" and search:
                try:
                    xp = F.pad(x, (0, 0, 0, m_pad - m)) if m_pad != m else x
                    found, res["search_api"] = cslt_search(packed, xp, bias)
                    candidates.append(found)
                except Exception as e:  # noqa: BLE001 - keep the default plan
                    errs.append(f"search M={m}: {_err(e)}")
                candidates += list(plans.values())  # what the search found at the other token counts
            best_t = None
            for cand in dict.fromkeys(tuple(c) for c in candidates):  # unique, in order
                try:
                    if cand != DEFAULT_PLAN:
                        y = call(cand, packs[:1])()
                        if _rel_err(y, F.linear(x, weight, bias)) > verify_tol:
                            raise RuntimeError(f"plan {cand} gives wrong results")
                    t = cuda_time_ms(call(cand, packs), warmup=warmup, iters=iters, repeats=repeats, graph=by_graph)
                except Exception as e:  # noqa: BLE001
                    errs.append(f"{'graph' if by_graph else 'eager'} M={m} plan {cand}: {_err(e)}")
                    continue
                if best_t is None or t < best_t:
                    best_t, plan = t, cand
            if best_t is None:
                continue
            if plan != DEFAULT_PLAN:
                plans[m_pad] = plan
            if by_graph:
                res["sparse_ms"][backend]["graph"][i] = best_t
            if "eager" in modes:
                try:
                    res["sparse_ms"][backend]["eager"][i] = cuda_time_ms(call(plan, packs), warmup=warmup,
                                                                       iters=iters, repeats=repeats, graph=False)
                except Exception as e:  # noqa: BLE001
                    errs.append(f"eager M={m}: {_err(e)}")
        del packs, packed, meta
    del weights
    for k in [k for k, v in res["errors"].items() if not v]:
        del res["errors"][k]
    return res
