"""The whole job behind the CLI's prune command: load, calibrate, evaluate, prune, evaluate, save."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .calibration import load_calibration
from .config import CalibrationConfig, EvalConfig, PruneConfig
from .evaluation.perplexity import load_eval_tokens, perplexity
from .models import check_output_dir, load_model, resolve_device, resolve_dtype, save_pretrained_atomic
from .pruner import prune
from .scorers import SCORERS
from .versions import package_versions

log = logging.getLogger(__name__)


def evaluate_ppl(model, tokenizer, eval_cfg: EvalConfig, device, cache: dict | None = None) -> dict:
    """Perplexity on each dataset of `eval_cfg`, with its protocol; `cache` keeps the tokenized texts."""
    out = {}
    cache = {} if cache is None else cache
    for name in eval_cfg.datasets:
        if name not in cache:
            cache[name] = load_eval_tokens(name, tokenizer, eval_cfg.data_dir, eval_cfg.seqlen)
        ids, where = cache[name]
        r = perplexity(model, ids, eval_cfg.seqlen, batch_size=eval_cfg.batch_size, device=device,
                       max_windows=eval_cfg.max_windows)
        r["source"] = where
        out[name] = r
        log.info("%s perplexity %.3f (%d windows of %d tokens)", name, r["ppl"], r["windows"], r["seqlen"])
    return out


def run_prune_job(model_spec: str | None, prune_cfg: PruneConfig, calib_cfg: CalibrationConfig,
                  eval_cfg: EvalConfig | None, output_dir: str | None = None, overwrite: bool = False,
                  dtype: str = "auto", eval_dense: bool = True) -> dict:
    """Load `model_spec`, prune it with `prune_cfg` on `calib_cfg` windows, report perplexity before and after,
    and save it atomically to `output_dir` with llmprune.json. Returns that record."""
    if output_dir:
        check_output_dir(output_dir, overwrite)  # refuse before any work
    device = resolve_device(prune_cfg.device)
    torch_dtype = resolve_dtype(dtype, device)
    t = time.perf_counter()
    loaded = load_model(model_spec, torch_dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    timings = {"load_model": time.perf_counter() - t}
    log.info("loaded %s (%s, %d blocks) in %.1f s", loaded.source, type(model).__name__,
             model.config.get_text_config().num_hidden_layers, timings["load_model"])

    calibration = None
    if SCORERS.get(prune_cfg.method).needs != "none":
        t = time.perf_counter()
        vocab = model.get_input_embeddings().weight.shape[0]
        calibration = load_calibration(calib_cfg, tokenizer, vocab_size=vocab)
        timings["calibration_data"] = time.perf_counter() - t

    ppl_cache: dict = {}
    before = after = None
    if eval_cfg is not None and eval_cfg.datasets and eval_dense:
        t = time.perf_counter()
        before = evaluate_ppl(model, tokenizer, eval_cfg, device, ppl_cache)
        timings["eval_dense"] = time.perf_counter() - t

    report = prune(model, prune_cfg, calibration)
    timings.update(report.timings)

    if eval_cfg is not None and eval_cfg.datasets:
        t = time.perf_counter()
        after = evaluate_ppl(model, tokenizer, eval_cfg, device, ppl_cache)
        timings["eval_pruned"] = time.perf_counter() - t

    record = {
        "model": loaded.source,
        "architecture": type(model).__name__,
        "config": {"prune": prune_cfg.to_dict(), "calibration": calib_cfg.to_dict(),
                   "eval": eval_cfg.to_dict() if eval_cfg else None, "dtype": str(torch_dtype).removeprefix("torch.")},
        "calibration": report.calibration,
        "seed": calib_cfg.seed,
        "versions": package_versions(),
        "device": report.device,
        "sparsity": report.sparsity,
        "layer_sparsity": report.layer_sparsity,
        "timings": timings,
        "block_timings": report.block_timings,
        "peak_memory": report.peak_memory,
        "perplexity": {"dense": before, "pruned": after},
    }
    if output_dir:
        t = time.perf_counter()
        path = save_pretrained_atomic(model, tokenizer, output_dir, {"llmprune.json": record}, overwrite=overwrite)
        record["output_dir"] = str(Path(path))
        log.info("saved in %.1f s", time.perf_counter() - t)
    return record
