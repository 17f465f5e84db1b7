"""Score the blocks of a model and remove the least important ones: `prune_blocks(model, config, tokens)`."""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn

from ..calibration import CalibrationData
from ..calibration.data import check_token_ids
from ..calibration.placement import auto_batch_size
from ..errors import LLMPruneError, memory_step
from ..models.arch import find_blocks, linear_layers, weight_oi
from ..models.load import resolve_device
from .base import BLOCK_SCORERS, BlockScorer
from .config import BlockPruneConfig
from .removal import check_removable, normalize_indices, num_params, remove_blocks
from .select import lowest_blocks, select_iteratively
from .states import boundary_totals, skip_totals

log = logging.getLogger(__name__)


def _check_tokens(model: nn.Module, tokens) -> torch.Tensor:
    if isinstance(tokens, CalibrationData):
        tokens = tokens.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise LLMPruneError("calibration tokens must be an integer tensor of shape (windows, seqlen)")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise LLMPruneError(f"calibration tokens need at least one window of >= 2 tokens, got {tuple(tokens.shape)}")
    check_token_ids(tokens, model.get_input_embeddings().weight.shape[0])
    return tokens.long()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _score(model: nn.Module, scorer: BlockScorer, tokens: torch.Tensor, device: torch.device, batch_size: int,
           logits_budget_mb: float | None = None) -> list[float]:
    lower = "a smaller --batch-size" + (", a smaller --logits-budget-mb" if scorer.needs == "skip" else "") + \
        ", --dtype bfloat16 or fewer --nsamples"
    with _eval_mode(model), memory_step(f"block scoring by {scorer.name}", lower):
        if scorer.needs == "boundary":
            totals = boundary_totals(model, tokens, scorer, device=device, batch_size=batch_size)
        else:
            totals = skip_totals(model, tokens, scorer, device=device, batch_size=batch_size,
                                 logits_budget_mb=logits_budget_mb)
    scores = [scorer.importance(t) for t in totals]
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        log.warning("%s: non-finite scores for blocks %s (a NaN score marks the block as important)", scorer.name, bad)
    return scores


def score_blocks(model: nn.Module, method: str, tokens, *, device: str | torch.device = "auto",
                 batch_size: int | None = None, logits_budget_mb: float | None = None) -> list[float]:
    """The importance of every block of `model` by `method` (higher = keep), on calibration `tokens`
    (windows, seqlen). The model is not changed. `logits_budget_mb`: MiB of float32 logits a chunk of the
    perplexity/KL scorers may hold (default `llmprune.logits.logits_budget`)."""
    scorer = BLOCK_SCORERS.get(method)()
    find_blocks(model)
    tokens = _check_tokens(model, tokens)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return _score(model, scorer, tokens, dev, batch_size or auto_batch_size(tokens), logits_budget_mb)


def forward_flops_per_token(model: nn.Module) -> int:
    """Matmul FLOPs of one token's forward: 2 x (weights of the blocks' linear layers + LM head); the
    attention-score products, which grow with the context, are left out."""
    weights = sum(weight_oi(layer).numel() for block in find_blocks(model).modules
                  for layer in linear_layers(block).values())
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        weights += head.weight.numel()
    return 2 * weights


@torch.no_grad()
def prune_blocks(model: nn.Module, config: BlockPruneConfig, calibration_tokens) -> dict:
    """Remove `config`'s number of blocks from `model`, in place, the least important first.

    Returns a report: `scores` (first round, per original block), `rounds` (each round's scored blocks,
    scores and removed block; one round when not iterative), `removed` and `kept` (original indices),
    parameters and matmul FLOPs per token before/after, the config fields rewritten, and timings (s)."""
    calibration = calibration_tokens if isinstance(calibration_tokens, CalibrationData) else None
    scorer = BLOCK_SCORERS.get(config.method)()
    blocks = check_removable(model)
    n = len(blocks)
    k = config.blocks_to_remove(n)
    protect = normalize_indices(config.protect, n, "protected block")
    if n - len(protect) < k:
        raise LLMPruneError(
            f"cannot remove {k} blocks: only {n - len(protect)} of {n} are not protected ({protect}); "
            "protect fewer blocks or remove fewer"
        )
    tokens = _check_tokens(model, calibration_tokens)
    device = resolve_device(config.device)
    batch_size = config.batch_size or auto_batch_size(tokens)
    params_before, flops_before = num_params(model), forward_flops_per_token(model)
    t0 = time.perf_counter()
    timings = {"scoring": 0.0, "removal": 0.0}
    changes: list[dict] = []

    def score(kept: list[int]) -> list[float]:
        t = time.perf_counter()
        s = _score(model, scorer, tokens, device, batch_size, config.logits_budget_mb)
        timings["scoring"] += time.perf_counter() - t
        log.info("%s: scores of blocks %s: %s", config.method, kept, ", ".join(f"{v:.4g}" for v in s))
        return s

    def remove(positions: list[int]) -> None:
        t = time.perf_counter()
        changes.append(remove_blocks(model, positions))
        timings["removal"] += time.perf_counter() - t

    if config.iterative:
        rounds = select_iteratively(score, lambda pos: remove([pos]), n, k, protect)
    else:
        scores = score(list(range(n)))
        chosen = lowest_blocks(scores, k, protect)
        remove(chosen)
        rounds = [{"blocks": list(range(n)), "scores": scores, "removed": chosen}]
    timings["total"] = time.perf_counter() - t0

    order = [i for r in rounds for i in r["removed"]]
    config_updates: dict[str, dict] = {}
    for change in changes:
        for key, ba in change["config_updates"].items():
            config_updates.setdefault(key, {"before": ba["before"]})["after"] = ba["after"]
    removed = sorted(order)
    log.info("%s: removed blocks %s of %d in %.1f s (scoring %.1f s)", config.method, removed, n, timings["total"],
             timings["scoring"])
    return {
        "config": config.to_dict(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "method": config.method,
        "num_blocks_before": n,
        "num_blocks_after": n - k,
        "protected": protect,
        "scores": rounds[0]["scores"],
        "rounds": rounds,
        "removed": removed,
        "removal_order": order,
        "kept": [i for i in range(n) if i not in set(removed)],
        "params_before": params_before,
        "params_after": num_params(model),
        "flops_per_token_before": flops_before,
        "flops_per_token_after": forward_flops_per_token(model),
        "config_updates": config_updates,
        "timings": timings,
        "device": str(device),
    }
