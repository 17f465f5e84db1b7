"""`prune(model, config, calibration) -> report`: the one in-place verb that the CLI also calls."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import BlockContext, CalibrationData, observe, run_sequential
from .calibration.data import check_token_ids
from .calibration.placement import BlockShuttle, auto_batch_size
from .calibration.runner import sync_compute
from .config import PruneConfig
from .errors import LLMPruneError, memory_step, step_detail
from .masks import apply_mask_
from .models.arch import find_blocks, in_features, linear_layers, weight_oi
from .models.load import resolve_device
from .progress import progress
from .scorers import SCORERS, Scorer

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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_prunable(model: nn.Module, config: PruneConfig) -> None:
    """Fail before touching the model: every block has linear layers, N:M widths divide by M."""
    pattern = config.pattern_spec
    blocks = find_blocks(model)
    for i, block in enumerate(blocks.modules):
        layers = linear_layers(block)
        if not layers:
            raise LLMPruneError(
                f"block {i} of {type(model).__name__} has no linear layers to prune; this architecture is not supported"
            )
        if pattern.kind == "nm":
            for name, layer in layers.items():
                if in_features(layer) % pattern.m:
                    raise LLMPruneError(
                        f"pattern {pattern.name}: input width {in_features(layer)} of {blocks.path}.{i}.{name} "
                        f"is not divisible by M={pattern.m}"
                    )


def _prune_layers(scorer: Scorer, layers: dict[str, nn.Module], stats: dict, config: PruneConfig,
                  prefix: str, zeros: dict[str, tuple[int, int]]) -> None:
    """Prune each layer of one block; record (zeros, size) per layer, counted on the block's device."""
    pattern, group = config.pattern_spec, config.group
    for name, layer in layers.items():
        w = weight_oi(layer)  # (out, in), a view into the parameter
        if scorer.needs != "none" and name not in stats:
            raise LLMPruneError(f"{prefix}.{name} saw no calibration input (an expert no token was routed to, or a "
                                "layer called with keyword input); it cannot be scored by "
                                f"{config.method}")
        result = scorer.prune(w, stats.get(name), pattern, group)
        if result.weight is not None:
            w.copy_(result.weight.to(w.dtype))
        apply_mask_(w, result.mask)
        zeros[f"{prefix}.{name}"] = ((w == 0).sum(), w.numel())  # a device scalar: read once at the end
    scorer.end_block()


def _peak_host_memory() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:  # noqa: BLE001
        return None


@torch.no_grad()
def prune(model: nn.Module, config: PruneConfig, calibration: CalibrationData | torch.Tensor | None = None) -> PruneReport:
    """Prune the linear layers of every Transformer block of `model` in place.

    Methods that need input statistics run the blocks in order on the calibration windows: hooks observe
    each linear layer's inputs (float32), the block is pruned, then re-run so that block i+1 is calibrated on
    the outputs of the already-pruned blocks. Embeddings and the LM head are never pruned."""
    if isinstance(calibration, torch.Tensor):
        from .bos import AS_GIVEN_PLAN

        calibration = CalibrationData(calibration, "tensor", "token ids given in memory", AS_GIVEN_PLAN)
    scorer_cls = SCORERS.get(config.method)
    scorer = scorer_cls(config)
    _check_prunable(model, config)
    device = resolve_device(config.device)
    if config.comparison_group and config.pattern_spec.kind == "nm":
        log.warning("--comparison-group is ignored for N:M patterns: each group of M weights competes")
    if calibration is not None:
        maxpos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if maxpos and calibration.seqlen > maxpos:
            raise LLMPruneError(f"calibration seqlen {calibration.seqlen} exceeds the model's "
                                f"max_position_embeddings {maxpos}; lower --seqlen")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    block_timings: list[dict[str, float]] = []
    need = scorer.needs
    zeros: dict[str, tuple[int, int]] = {}
    transfers: dict[str, float] = {}
    blocks_path = find_blocks(model).path

    if need == "none":
        blocks = find_blocks(model)
        shuttle = BlockShuttle(blocks.modules, device)  # block i+1 comes and i-1 goes while i is pruned
        try:
            for i in progress(range(len(blocks)), desc=f"{config.method}: blocks", unit="block", leave=False):
                tb = time.perf_counter()
                step_detail(f"block {i + 1}/{len(blocks)}")  # named in the one line of an unexpected error
                block = shuttle.get(i)
                try:
                    _prune_layers(scorer, linear_layers(block), {}, config, f"{blocks.path}.{i}", zeros)
                finally:
                    shuttle.put(i)
                block_timings.append({"prune": time.perf_counter() - tb, "total": time.perf_counter() - tb})
            step_detail(None)
        finally:
            shuttle.close()
            transfers.update(shuttle.transfer_seconds)
    else:
        if calibration is None:
            raise LLMPruneError(f"method {config.method} needs calibration data")
        tokens = calibration.tokens
        check_token_ids(tokens, model.get_input_embeddings().weight.shape[0])
        batch_size = config.batch_size or auto_batch_size(tokens)

        lower = "a smaller --batch-size, --offload-activations cpu, --dtype bfloat16 or fewer --nsamples"

        def process(ctx: BlockContext) -> None:
            layers = linear_layers(ctx.block)
            t = time.perf_counter()
            with memory_step(f"calibration of block {ctx.index}", lower):
                with observe(ctx.block, layers, need, stop_early=True) as stats:
                    ctx.forward()
                sync_compute(device)
            ctx.timings["calibrate"] = time.perf_counter() - t
            t = time.perf_counter()
            with memory_step(f"{config.method} pruning of block {ctx.index}", "--dtype bfloat16 or --device cpu"):
                _prune_layers(scorer, layers, stats, config, f"{blocks_path}.{ctx.index}", zeros)
                sync_compute(device)
            ctx.timings["prune"] = time.perf_counter() - t

        with memory_step(f"{config.method} pruning (block inputs and outputs)", lower):
            block_timings = run_sequential(model, tokens, process, device=device, batch_size=batch_size,
                                           offload_activations=config.offload_activations, desc=config.method,
                                           release_inputs=True, transfers=transfers)
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
                       peak_memory=peak, device=str(device))

