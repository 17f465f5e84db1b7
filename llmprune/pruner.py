"""`prune(model, config, calibration) -> report`: the one in-place verb that the CLI also calls."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import ALLOCATIONS, Allocation, UnitRef, check_plan
from .calibration import BlockContext, CalibrationData, observe, run_sequential
from .calibration.compiled import compile_available, observe_compiled
from .calibration.data import check_token_ids
from .calibration.placement import BlockShuttle, auto_batch_size
from .calibration.runner import sync_compute
from .config import PruneConfig
from .errors import LLMPruneError, memory_step, step_detail
from .masks import Pattern
from .models.arch import find_blocks, linear_layers, weight_oi
from .models.load import resolve_device
from .progress import progress
from .scorers import SCORERS, Scorer
from .stats import pass_for, require_stats
from .targets import TARGETS, Target, Unit

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What prune() did: per-layer measured sparsity, timings (s) and peak memory (bytes)."""

    config: dict
    calibration: dict | None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    sparsity: float = 0.0  # over all pruned layers
    timings: dict[str, float] = field(default_factory=dict)
    block_timings: list[dict[str, float]] = field(default_factory=list)
    peak_memory: dict[str, int | None] = field(default_factory=dict)
    device: str = "cpu"
    compiled: bool = False  # the calibration passes ran through torch.compile

    def to_dict(self) -> dict:
        return dict(self.__dict__)




def _peak_host_memory() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:  # noqa: BLE001
        return None


@dataclass
class _Parts:
    """The engine's four registered parts for one run, and the plan they agreed on."""

    scorer: Scorer
    allocation: Allocation
    target: Target
    units: list[list[Unit]]  # per block
    plan: list[dict[str, Pattern]] = field(default_factory=list)  # per block: unit name -> its pattern


def _resolve_parts(model: nn.Module, config: PruneConfig) -> _Parts:
    """The scorer, allocation and target of `config`, and every block's units; fails before touching the model
    (a block without units: an unsupported architecture)."""
    blocks = find_blocks(model)
    target = TARGETS.get(config.target)(config)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    units = []
    for i, block in enumerate(blocks.modules):
        u = target.units(block, text_config)
        if not u:
            raise LLMPruneError(
                f"block {i} of {type(model).__name__} has no linear layers to prune; this architecture is not supported"
            )
        units.append(u)
    return _Parts(SCORERS.get(config.method)(config), ALLOCATIONS.get(config.allocation)(config), target, units)


def _plan(model: nn.Module, parts: _Parts, config: PruneConfig, summary) -> None:
    """The allocation's pattern for every unit, checked by the target against each block (before any change)."""
    refs = [UnitRef(i, u.name, u.size) for i, us in enumerate(parts.units) for u in us]
    plan = parts.allocation.plan(config.pattern_spec, refs, summary)
    check_plan(plan, refs, config.allocation)
    blocks = find_blocks(model)
    parts.plan = [{u.name: plan[(i, u.name)] for u in us} for i, us in enumerate(parts.units)]
    for i, block in enumerate(blocks.modules):
        parts.target.check(block, parts.units[i], parts.plan[i], f"{blocks.path}.{i}")


def _prune_block(parts: _Parts, ctx: BlockContext, stats: dict, config: PruneConfig, prefix: str,
                 zeros: dict[str, tuple[int, int]]) -> None:
    """Decide and apply every unit of one block; record (zeros, size) per layer, counted on the block's device."""
    units = parts.units[ctx.index]
    require_stats(stats, [n for u in units for n in u.layers], parts.scorer.needs, prefix, config.method)
    group = config.group
    for unit in units:
        decision = parts.target.decide(parts.scorer, ctx.block, unit, stats, parts.plan[ctx.index][unit.name], group)
        parts.target.apply(ctx.block, unit, decision)
        for name in unit.layers:
            w = weight_oi(ctx.block.get_submodule(name))
            zeros[f"{prefix}.{name}"] = ((w == 0).sum(), w.numel())  # a device scalar: read once at the end
    parts.scorer.end_block()


def _each_block(model: nn.Module, process, device: torch.device, desc: str,
                transfers: dict[str, float]) -> list[dict[str, float]]:
    """Run `process(ctx)` on every block in order without calibration data (no statistics to collect): block
    i+1 comes and i-1 goes while i is processed (the runner's BlockShuttle)."""
    blocks = find_blocks(model)
    shuttle = BlockShuttle(blocks.modules, device)
    timings = []
    try:
        for i in progress(range(len(blocks)), desc=desc, unit="block", leave=False):
            tb = time.perf_counter()
            step_detail(f"block {i + 1}/{len(blocks)}")  # named in the one line of an unexpected error
            ctx = BlockContext(i, len(blocks), shuttle.get(i), device, [], [])
            try:
                process(ctx)
            finally:
                shuttle.put(i)
            ctx.timings["total"] = time.perf_counter() - tb
            timings.append(ctx.timings)
        step_detail(None)
    finally:
        shuttle.close()
        transfers.update(shuttle.transfer_seconds)
    return timings


def _check_calibration(model: nn.Module, calibration: CalibrationData | None, method: str) -> torch.Tensor:
    if calibration is None:
        raise LLMPruneError(f"method {method} needs calibration data")
    tokens = calibration.tokens
    check_token_ids(tokens, model.get_input_embeddings().weight.shape[0])
    return tokens


def _prepass(model: nn.Module, parts: _Parts, tokens: torch.Tensor, config: PruneConfig, device: torch.device,
             batch_size: int) -> dict:
    """The allocation's dense pre-pass: its statistics of every block of the unpruned model, summarized per
    block by the allocation (nothing is pruned; the blocks are not written back)."""
    summary: dict = {}
    need = parts.allocation.prepass

    def process(ctx: BlockContext) -> None:
        layers = {n: ctx.block.get_submodule(n) for u in parts.units[ctx.index] for n in u.layers}
        with memory_step(f"allocation pre-pass of block {ctx.index}", _LOWER):
            with observe(ctx.block, layers, need, stop_early=True) as stats:
                ctx.forward()
        weights = {n: weight_oi(m) for n, m in layers.items()}
        for name, value in parts.allocation.summarize(ctx.index, weights, stats).items():
            summary[(ctx.index, name)] = value

    with memory_step(f"{config.allocation} allocation pre-pass (block inputs and outputs)", _LOWER):
        run_sequential(model, tokens, process, device=device, batch_size=batch_size,
                       offload_activations=config.offload_activations, desc=f"{config.allocation}: pre-pass",
                       writeback=False, release_inputs=True)
    return summary


_COMPILE_AUTO_FLOP = 2e15  # `compile="auto"` compiles on CUDA above this (two passes' FLOPs): ~3 s at 700 TFLOP/s


def _use_compile(model: nn.Module, config: PruneConfig, tokens: torch.Tensor | None, device: torch.device) -> bool:
    """Whether the calibration passes run compiled: "on"/"off" as asked; "auto" on CUDA (with triton) when the two
    passes' FLOPs are large enough for the one-time compile (seconds) to pay off."""
    if tokens is None or config.compile == "off":
        return False
    if config.compile == "on":
        return True
    if not compile_available(device):
        return False
    params = sum(weight_oi(m).numel() for b in find_blocks(model).modules for m in linear_layers(b).values())
    return 2 * 2 * params * tokens.numel() > _COMPILE_AUTO_FLOP


_LOWER = "a smaller --batch-size, --offload-activations cpu, --dtype bfloat16 or fewer --nsamples"


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig, calibration: CalibrationData | torch.Tensor | None = None) -> PruneReport:
    """Prune the linear layers of every Transformer block of `model` in place.

    One block loop over four registered parts: for each block, the statistics the scorer needs are collected
    (`llmprune.stats`; hooks observe each linear layer's inputs, float32, over the calibration windows), the
    target's units are scored and decided at the pattern the allocation planned for them, and the decisions
    applied; then the block is re-run so that block i+1 is calibrated on the outputs of the already-pruned
    blocks. A scorer that needs no statistics (magnitude) runs the same loop without calibration data.
    Embeddings and the LM head are never pruned."""
    if isinstance(calibration, torch.Tensor):
        from .bos import AS_GIVEN_PLAN

        calibration = CalibrationData(calibration, "tensor", "token ids given in memory", AS_GIVEN_PLAN)
    parts = _resolve_parts(model, config)
    scorer = parts.scorer
    if not parts.allocation.prepass:
        _plan(model, parts, config, None)  # checked before anything else, as the model is untouched
    device = resolve_device(config.device)
    if config.comparison_group and config.pattern_spec.kind == "nm":
        log.warning("--comparison-group is ignored for N:M patterns: each group of M weights competes")
    if calibration is not None:
        maxpos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if maxpos and calibration.seqlen > maxpos:
            raise LLMPruneError(f"calibration seqlen {calibration.seqlen} exceeds the model's "
                                f"max_position_embeddings {maxpos}; lower --seqlen")
    the_pass = pass_for(scorer.needs + parts.allocation.prepass)
    if the_pass == "backward":
        raise LLMPruneError(f"method {config.method} needs a backward pass, which this version does not run")
    tokens = _check_calibration(model, calibration, config.method) if the_pass == "forward" else None
    batch_size = (config.batch_size or auto_batch_size(tokens)) if tokens is not None else 0
    use_compile = _use_compile(model, config, tokens, device)
    if parts.allocation.prepass:
        _plan(model, parts, config, _prepass(model, parts, tokens, config, device, batch_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    need = scorer.needs
    zeros: dict[str, tuple[int, int]] = {}
    transfers: dict[str, float] = {}
    blocks_path = find_blocks(model).path

    def process(ctx: BlockContext) -> None:
        stats: dict = {}
        if need:
            layers = {n: ctx.block.get_submodule(n) for u in parts.units[ctx.index] for n in u.layers}
            t = time.perf_counter()
            with memory_step(f"calibration of block {ctx.index}", _LOWER):
                if use_compile:
                    with observe_compiled(ctx.block, layers, need, ctx.calls, ctx.inputs) as (stats, run):
                        for b in range(len(ctx.inputs)):
                            run(b, device)
                else:
                    with observe(ctx.block, layers, need, stop_early=True) as stats:
                        ctx.forward()
                sync_compute(device)
            ctx.timings["calibrate"] = time.perf_counter() - t
        t = time.perf_counter()
        with memory_step(f"{config.method} pruning of block {ctx.index}", "--dtype bfloat16 or --device cpu"):
            _prune_block(parts, ctx, stats, config, f"{blocks_path}.{ctx.index}", zeros)
            sync_compute(device)
        ctx.timings["prune"] = time.perf_counter() - t

    if need:
        with memory_step(f"{config.method} pruning (block inputs and outputs)", _LOWER):
            block_timings = run_sequential(model, tokens, process, device=device, batch_size=batch_size,
                                           offload_activations=config.offload_activations, desc=config.method,
                                           release_inputs=True, transfers=transfers, compiled=use_compile)
    else:
        block_timings = _each_block(model, process, device, f"{config.method}: blocks", transfers)
    parts.target.finalize(model)
    zeros = {k: (int(z), n) for k, (z, n) in zeros.items()}
    total = time.perf_counter() - t0
    layer_sp = {k: z / n for k, (z, n) in zeros.items()}
    overall = sum(z for z, _ in zeros.values()) / max(1, sum(n for _, n in zeros.values()))
    timings = {"prune_total": total}
    for key in ("calibrate", "prune", "propagate"):
        timings[key] = sum(bt.get(key, 0.0) for bt in block_timings)
    for key, v in transfers.items():  # overlapped with the computation on a GPU
        timings[f"blocks_{key}"] = v
    peak = {"host_max_rss": _peak_host_memory(),
            "gpu_max_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    log.info("%s %s: %.1f %% of block weights pruned in %.1f s", config.method, config.pattern_spec.name,
             100 * overall, total)
    return PruneReport(config=config.to_dict(), calibration=calibration.to_dict() if calibration is not None else None,
                       layer_sparsity=layer_sp, sparsity=overall, timings=timings, block_timings=block_timings,
                       peak_memory=peak, device=str(device), compiled=use_compile)

