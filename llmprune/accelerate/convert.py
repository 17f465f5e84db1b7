"""`accelerate_2of4_`, the in-place verb: find the blocks' 2:4 linear layers, time each distinct weight shape,
decide, replace the winners by `Sparse24Linear`, check each against dense, and report.

* Decide by measuring, once per distinct (out_features, in_features, dtype) (`timing.measure_shape`, then
  `policy.decide`).
* Every replaced layer is checked against dense `F.linear` on random input (relative error <= `verify_tol`);
  a layer that fails stays dense, with the reason in the report. The report's "verify" section gives the largest
  such error over the converted layers, next to the bf16 floor: the same input through dense bf16 `F.linear`
  and through the sparse kernel, each against a float32 product of the same weight.
* Without CUDA, without a semi-structured backend, or with no eligible layer, nothing is replaced and the report
  says why.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMPruneError
from ..models.arch import find_blocks, linear_layers
from .backends import BACKENDS, SUPPORTED_DTYPES, available_backends, cslt_api, shape_fits
from .layer import NEVER, TIMING_MODES, Sparse24Linear
from .ops import is_2of4
from .policy import _validate, decide
from .timing import _err, _rel_err, measure_shape

log = logging.getLogger(__name__)

DEFAULT_TOKEN_COUNTS = (1, 8, 32, 128, 512, 2048, 8192)


def shape_key(layer: nn.Module) -> tuple[int, int, str]:
    """(out_features, in_features, dtype name): layers with one key share one measurement."""
    out_f, in_f = layer.weight.shape
    return int(out_f), int(in_f), str(layer.weight.dtype).removeprefix("torch.")


def group_by_shape(layers: Mapping[str, nn.Module]) -> dict[tuple[int, int, str], list[str]]:
    """Layer names grouped by `shape_key`, groups and names in first-seen order."""
    groups: dict[tuple[int, int, str], list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(shape_key(layer), []).append(name)
    return groups


def scan_layers(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """The blocks' linear layers split into eligible ones (2:4, fp16/bf16, nn.Linear) and skipped ones with the
    reason, by dotted name from the model root."""
    blocks = find_blocks(model)
    eligible, skipped = {}, {}
    for i, block in enumerate(blocks.modules):
        for name, layer in block.named_modules():
            if isinstance(layer, Sparse24Linear):
                skipped[f"{blocks.path}.{i}.{name}"] = "already a Sparse24Linear"
        for name, layer in linear_layers(block).items():
            full = f"{blocks.path}.{i}.{name}"
            if not isinstance(layer, nn.Linear):
                skipped[full] = f"{type(layer).__name__} is not an nn.Linear"
            elif layer.weight.dtype not in SUPPORTED_DTYPES:
                skipped[full] = (f"dtype {str(layer.weight.dtype).removeprefix('torch.')} has no 2:4 kernel "
                                 "(convert the model to bfloat16 or float16)")
            elif not is_2of4(layer.weight.data):
                skipped[full] = "not 2:4"
            else:
                eligible[full] = layer
    return eligible, skipped


def _count(reasons: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


VERIFY_TOKENS = 16  # rows of the random input each converted layer is checked on


def _verify_note(verify: dict, name: str, entry: dict, err: float, y_sparse, y_dense, x, layer) -> None:
    """Fold one layer's check into the report's "verify" section and its shape entry (max over layers)."""
    def bump(d, key, v):
        if v is not None and (d.get(key) is None or v > d[key]):
            d[key] = v
            return True
        return False
    verify["layers"] += 1
    if bump(verify, "max_rel_err_sparse_vs_dense", err):
        verify["max_layer"] = name
    bump(entry, "verify_max_rel_err", err)
    try:  # the bf16 floor: both results against a float32 product of the same (bf16-valued) weight and input
        ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        bump(verify, "max_rel_err_sparse_vs_fp32", _rel_err(y_sparse, ref))
        bump(verify, "max_rel_err_dense_vs_fp32", _rel_err(y_dense, ref))
        del ref
    except Exception:  # noqa: BLE001 - the floor is informative only
        pass


def _json_thr(thr: Mapping[str, int | None]) -> dict[str, int | None]:
    return {k: (None if v is None or v >= NEVER else int(v)) for k, v in thr.items()}


@torch.no_grad()
def accelerate_2of4_(model: nn.Module, *, device: str | torch.device | None = None,
                     token_counts: Iterable[int] = DEFAULT_TOKEN_COUNTS, policy: str = "dispatch",
                     backends: Iterable[str] = BACKENDS, timing_modes: Iterable[str] = TIMING_MODES,
                     min_speedup: float = 1.03, warmup: int = 3, iters: int = 20, repeats: int = 5,
                     search: bool = True, verify_tol: float = 2e-2, require_all: bool = False) -> dict:
    """Replace, in place, the blocks' 2:4 linear layers by `Sparse24Linear` where the sparse kernel is faster.

    `token_counts`: the M (batch x new tokens) of the workload, e.g. (1, 32, 2048, 16384) for decode at batch 1
    and 32 and 2048-token prefill at batch 1 and 8; thresholds are only as good as the counts measured.
    `policy`: "dispatch" (default; keep a dense copy where sparse loses at small M), "sparse-only" (no dense
    copies: replace only shapes that win at every M), "always" (replace every eligible layer, no timing).
    Returns a JSON-ready report: per shape the timings, decision, backend and plans; layer counts and reasons.
    Falls back (replaces nothing; "status": "fallback" and a "reason") without CUDA or a usable backend."""
    t0 = time.perf_counter()
    counts = _validate(policy, token_counts, min_speedup)
    backends = (backends,) if isinstance(backends, str) else tuple(backends)
    timing_modes = (timing_modes,) if isinstance(timing_modes, str) else tuple(timing_modes)
    modes = [m for m in TIMING_MODES if m in set(timing_modes)]
    if not modes:
        raise LLMPruneError(f"timing_modes must include one of {', '.join(TIMING_MODES)}, got {timing_modes!r}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise LLMPruneError(f"unknown 2:4 backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
    eligible, skipped = scan_layers(model)
    if require_all and skipped:
        name, why = next(iter(skipped.items()))
        raise LLMPruneError(f"{len(skipped)} block linear layer(s) cannot be accelerated, e.g. {name}: {why}")
    report = {"status": "fallback", "reason": None, "policy": policy, "token_counts": list(counts),
              "timing_modes": modes, "min_speedup": min_speedup, "torch": torch.__version__,
              "cuda": torch.version.cuda, "device": None, "cusparselt_version": None, "cslt_api": cslt_api(),
              "search_api": None, "backends_available": [], "backends_unavailable": {}, "shapes": [],
              "layers": {"total": len(eligible) + len(skipped), "eligible": len(eligible), "replaced": 0,
                         "dispatching": 0, "sparse_only": 0, "kept_dense": len(eligible) + len(skipped),
                         "kept_dense_reasons": _count(skipped.values())},
              "layer_decisions": {**{n: f"dense: {r}" for n, r in skipped.items()}},
              "memory": {"compressed_bytes": 0, "dense_copy_bytes": 0, "dense_bytes_freed": 0}, "verify": None,
              "seconds": None}

    def fallback(reason: str) -> dict:
        log.warning("2:4 acceleration: nothing replaced: %s", reason)
        report["reason"] = reason
        for n in eligible:
            report["layer_decisions"][n] = f"dense: {reason}"
        report["layers"]["kept_dense_reasons"] = _count(r.removeprefix("dense: ")
                                                        for r in report["layer_decisions"].values())
        report["seconds"] = time.perf_counter() - t0
        return report

    if not eligible:
        why = "; ".join(f"{k} ({v})" for k, v in _count(skipped.values()).items()) or "no linear layers"
        return fallback(f"no eligible 2:4 linear layer in the blocks: {why}")
    if not torch.cuda.is_available():
        return fallback("CUDA is not available")
    devices = {layer.weight.device for layer in eligible.values()}
    if device is not None:
        want = torch.device(device)
        if any(d.type != want.type or (want.index is not None and d.index != want.index) for d in devices):
            raise LLMPruneError(f"the model's layers are on {sorted(map(str, devices))}, not {want}; move the model "
                                f"there first (model.to({str(want)!r}))")
    if len(devices) > 1:
        raise LLMPruneError(f"the block layers are spread over {sorted(map(str, devices))}; put the model on one GPU")
    dev = next(iter(devices))
    report["device"] = str(dev)
    if dev.type != "cuda":
        return fallback(f"the model is on {dev}; move it to a CUDA device first (model.cuda())")
    report["device"] = f"{dev} ({torch.cuda.get_device_name(dev)})"
    ok, why_not = available_backends(dev)
    ok = [b for b in ok if b in set(backends)]
    report["backends_available"], report["backends_unavailable"] = ok, why_not
    if getattr(torch.backends, "cusparselt", None) is not None and "cusparselt" in ok:
        try:
            report["cusparselt_version"] = torch.backends.cusparselt.version()
        except Exception:  # noqa: BLE001
            pass
    if not ok:
        return fallback("no semi-structured sparse backend: " + "; ".join(f"{k}: {v}" for k, v in why_not.items()))

    groups = group_by_shape(eligible)
    replacements: dict[str, Sparse24Linear] = {}
    verify = report["verify"] = {"tol": verify_tol, "tokens": VERIFY_TOKENS, "layers": 0,
                                 "max_rel_err_sparse_vs_dense": None, "max_layer": None,
                                 "max_rel_err_sparse_vs_fp32": None, "max_rel_err_dense_vs_fp32": None,
                                 "note": "one random input per layer; sparse vs dense bf16 F.linear, and both against "
                                         "a float32 product of the same weight (the bf16 rounding floor)"}
    for (out_f, in_f, dt), names in groups.items():
        first = eligible[names[0]]
        fits = {b: shape_fits(b, out_f, in_f, first.weight.dtype) for b in ok}
        usable = [b for b in ok if fits[b] is None]
        entry = {"shape": [out_f, in_f], "dtype": dt, "layers": len(names), "token_counts": list(counts),
                 "backends_tried": usable, "backends_refused": {b: r for b, r in fits.items() if r}}
        report["shapes"].append(entry)
        if not usable:
            reason = "; ".join(f"{b}: {r}" for b, r in fits.items())
            entry.update(decision="dense", reason=reason)
            for n in names:
                report["layer_decisions"][n] = f"dense: {reason}"
            continue
        if policy == "always":
            dec = {"decision": "sparse", "backend": usable[0], "dense_below": {m: 0 for m in modes},
                   "keep_dense": False, "reason": None}
            plans = {}
        else:
            log.info("2:4 shape (%d, %d) %s x %d layers: timing dense vs %s at M=%s", out_f, in_f, dt, len(names),
                     "/".join(usable), list(counts))
            meas = measure_shape(first.weight.data, first.bias.data if first.bias is not None else None, counts,
                                 usable, modes=modes, warmup=warmup, iters=iters, repeats=repeats, search=search,
                                 verify_tol=verify_tol)
            report["search_api"] = report["search_api"] or meas["search_api"]
            dec = decide(counts, meas["dense_ms"], meas["sparse_ms"], policy=policy, min_speedup=min_speedup)
            plans = meas["plans"].get(dec["backend"], {}) if dec["backend"] else {}
            entry.update(dense_ms=meas["dense_ms"], sparse_ms=meas["sparse_ms"], errors=meas["errors"],
                         rel_err=meas["rel_err"], weight_copies=meas["weight_copies"],
                         plans={b: {str(k): list(v) for k, v in p.items()} for b, p in meas["plans"].items()})
        entry.update(decision=dec["decision"], backend=dec["backend"], dense_below=_json_thr(dec["dense_below"]),
                     keep_dense=dec["keep_dense"], reason=dec["reason"])
        log.info("2:4 shape (%d, %d): %s%s", out_f, in_f, dec["decision"],
                 f" via {dec['backend']}, dense below {_json_thr(dec['dense_below'])}" if dec["backend"] else
                 f" ({dec['reason']})")
        if dec["decision"] == "dense":
            for n in names:
                report["layer_decisions"][n] = f"dense: {dec['reason']}"
            continue
        for n in names:
            layer = eligible[n]
            try:
                new = Sparse24Linear.from_linear(layer, dec["backend"], keep_dense=dec["keep_dense"],
                                                 dense_below=dec["dense_below"], plans=plans)
                x = torch.randn(VERIFY_TOKENS, in_f, device=dev, dtype=layer.weight.dtype,
                                generator=torch.Generator(device=dev).manual_seed(1))
                new.set_mode("sparse")
                y_sparse = new(x)
                new.set_mode("eager")
                y_dense = F.linear(x, layer.weight, layer.bias)
                err = _rel_err(y_sparse, y_dense)
                if not err <= verify_tol:
                    raise RuntimeError(f"relative error {err:.2e} > {verify_tol:g} against dense")
                _verify_note(verify, n, entry, err, y_sparse, y_dense, x, layer)
            except Exception as e:  # noqa: BLE001 - this layer stays dense
                report["layer_decisions"][n] = f"dense: conversion failed: {_err(e)}"
                continue
            replacements[n] = new
            report["layer_decisions"][n] = "dispatch" if dec["keep_dense"] else "sparse"

    mem = report["memory"]
    for name, new in replacements.items():
        parent_name, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent_name), attr, new)
        nbytes = old.weight.numel() * old.weight.element_size()
        mem["compressed_bytes"] += new.packed.numel() * new.packed.element_size() + (
            new.meta.numel() * new.meta.element_size() if new.meta is not None else 0)
        if new.weight is not None:
            mem["dense_copy_bytes"] += nbytes
        else:
            mem["dense_bytes_freed"] += nbytes
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    decisions = report["layer_decisions"].values()
    L = report["layers"]
    L["replaced"] = len(replacements)
    L["dispatching"] = sum(d == "dispatch" for d in decisions)
    L["sparse_only"] = sum(d == "sparse" for d in decisions)
    L["kept_dense"] = L["total"] - L["replaced"]
    L["kept_dense_reasons"] = _count(d.removeprefix("dense: ") for d in decisions if d.startswith("dense: "))
    report["status"] = "converted" if replacements else "fallback"
    if not replacements:
        report["reason"] = "no layer was faster sparse (see shapes)"
    report["seconds"] = time.perf_counter() - t0
    log.info("2:4 acceleration: %d of %d block linear layers replaced (%d dispatching with a dense copy) in %.1f s",
             L["replaced"], L["total"], L["dispatching"], report["seconds"])
    return report
