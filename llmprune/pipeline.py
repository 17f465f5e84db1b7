"""The whole job behind the CLI's prune command: load, calibrate, evaluate, prune, evaluate, save."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from .calibration import load_calibration
from .calibration.data import data_dir_label as _data_dir_label
from .config import CalibrationConfig, EvalConfig, PruneConfig
from .errors import LLMPruneError, memory_step, named_steps, set_step
from .evaluation.perplexity import load_eval_tokens, perplexity
from .models import (SAVE_DTYPES, DTYPES, cast_for_save_, checkpoint_bytes, dtype_label, load_model,
                     model_bytes, resolve_device, resolve_dtype, resolve_save_dtype, save_pretrained_atomic)
from .models import check_context
from .outputs import (check_free_space, check_output_dir, check_results_free, check_writable, output_errors,
                      reserve_output_dir, write_output_dir, write_text_atomic)
from .pruner import prune
from .record import JobConfig, JobRecord, Perplexity
from .scorers import SCORERS
from .versions import package_versions

log = logging.getLogger(__name__)


def evaluate_ppl(model, tokenizer, eval_cfg: EvalConfig, device, cache: dict | None = None) -> dict:
    """Perplexity on each dataset of `eval_cfg`, with its protocol; `cache` keeps the tokenized texts."""
    from .bos import resolve_bos

    out = {}
    cache = {} if cache is None else cache
    bos = resolve_bos(eval_cfg.bos, tokenizer, model.config)
    for name in eval_cfg.datasets:
        if name not in cache:
            cache[name] = load_eval_tokens(name, tokenizer, eval_cfg.data_dir, eval_cfg.seqlen, bos=bos)
        ids, where = cache[name]
        lower = "a smaller --eval-batch-size or --logits-budget-mb, or --dtype bfloat16"
        with memory_step(f"perplexity on {name}", lower):
            r = perplexity(model, ids, eval_cfg.seqlen, batch_size=eval_cfg.batch_size, device=device,
                           max_windows=eval_cfg.max_windows, desc=f"perplexity {name}", bos=bos,
                           logits_budget_mb=eval_cfg.logits_budget_mb)
        r["source"] = where
        out[name] = r
        log.info("%s perplexity %.3f (%d windows of %d tokens)", name, r["ppl"], r["windows"], r["seqlen"])
    return out


def run_prune_job(model_spec: str | None, prune_cfg: PruneConfig | None, calib_cfg: CalibrationConfig,
                  eval_cfg: EvalConfig | None, output_dir: str | None = None, overwrite: bool = False, **job) -> JobRecord:
    """`_run_prune_job` with `output_dir` checked and locked before any work, for the whole run (so a second run
    on the same folder refuses at once), and the lock removed at the end whatever happens (llmprune.outputs).
    The output folder may not be the model's own folder (or hold it): --overwrite would replace the original."""
    if output_dir and model_spec and Path(model_spec).expanduser().exists():
        src, dst = Path(model_spec).expanduser().resolve(), Path(output_dir).expanduser().resolve()
        if dst == src or dst in src.parents:
            raise LLMPruneError(f"--output-dir {output_dir} is (or holds) the model being pruned, {model_spec}: "
                                "choose another folder, so the original stays")
    with reserve_output_dir(output_dir, overwrite) if output_dir else contextlib.nullcontext() as reservation:
        return _run_prune_job(model_spec, prune_cfg, calib_cfg, eval_cfg, output_dir, overwrite,
                              reservation=reservation, **job)


@named_steps  # an unexpected error names the phase it came from (llmprune.errors.step)
def _run_prune_job(model_spec: str | None, prune_cfg: PruneConfig | None, calib_cfg: CalibrationConfig,
                   eval_cfg: EvalConfig | None, output_dir: str | None = None, overwrite: bool = False,
                   dtype: str = "auto", eval_dense: bool = True, tasks=(), limit: int | None = None,
                   block_cfg=None, base_model: str | None = None, license: str | None = None,
                   save_dtype: str = "auto", cache_dir: str | None = None, use_cache: bool = True,
                   reservation=None) -> JobRecord:
    """Load `model_spec`, remove blocks with `block_cfg` (a BlockPruneConfig) if given, then prune weights with
    `prune_cfg` if given (calibrated on the model that remains), on `calib_cfg` windows; report perplexity before and after,
    and save it atomically to `output_dir` with llmprune.json. `tasks` (perplexity datasets and lm-eval zero-shot
    tasks) are evaluated on the pruned model too, into results.json/results.md. The model is saved in
    `save_dtype` (`auto`: the checkpoint's own precision, see `resolve_save_dtype`); a GGUF's conversion is cached
    in `cache_dir` unless not `use_cache` (see `load_model`). Returns that record (a `JobRecord`: its
    `to_dict()` is llmprune.json, with `output_dir` added).

    The record holds no absolute local path (`export.provenance`: the model by name or Hub id, `base_model` the
    Hub id of a local model, data files by relative path and sha256), nor does any file saved with it."""
    from .calibration.data import as_used, is_token_file
    from .evaluation.harness import check_eval_counts, split_tasks

    set_step("checking the options")
    ppl_tasks = split_tasks(tasks)[0] if tasks else []
    check_eval_counts(limit, eval_cfg.max_windows if eval_cfg else None)
    if save_dtype not in SAVE_DTYPES:
        resolve_save_dtype(save_dtype, None, torch.float32)  # the one-line error, before any work
    if prune_cfg is None and block_cfg is None:
        raise LLMPruneError("nothing to do: give a weight method, a block method, or both")
    device = resolve_device((prune_cfg or block_cfg).device)
    torch_dtype = resolve_dtype(dtype, device)
    if output_dir:  # room for the saved model: before loading where the files tell its size, else right after
        # before loading, at the checkpoint's size where `auto` (see checkpoint_bytes); exactly once it has loaded
        check_free_space(output_dir, checkpoint_bytes(model_spec, DTYPES.get(save_dtype, "auto")), "the pruned model")
    t = time.perf_counter()
    set_step("loading the model")
    loaded = load_model(model_spec, torch_dtype, cache_dir=cache_dir, use_cache=use_cache)
    model, tokenizer = loaded.model, loaded.tokenizer
    set_step("checking the options against the model")
    if (eval_cfg is not None and eval_cfg.datasets) or ppl_tasks:  # windows no longer than the model's context
        check_context(model, tokenizer, eval_cfg.seqlen if eval_cfg else calib_cfg.seqlen,
                      "--eval-seqlen" if eval_cfg else "--seqlen")
    needs_calibration = block_cfg is not None or prune_cfg.needs_calibration
    if needs_calibration and not is_token_file(calib_cfg.source):  # a token file's windows: once it is read
        check_context(model, tokenizer, calib_cfg.seqlen, "--seqlen")
    if output_dir:
        check_free_space(output_dir, model_bytes(model, resolve_save_dtype(save_dtype, loaded, next(model.parameters()).dtype)),
                         "the pruned model")
    timings = {"load_model": time.perf_counter() - t}
    log.info("loaded %s (%s, %d blocks) in %.1f s", loaded.source, type(model).__name__,
             model.config.get_text_config().num_hidden_layers, timings["load_model"])
    from .evaluation.compression import zero_counts

    zeros_before = zero_counts(model)  # e.g. a dequantized GGUF already holds exact zeros

    if block_cfg is not None:
        from .models.arch import find_blocks

        block_cfg.blocks_to_remove(len(find_blocks(model)))  # refuse K >= blocks before any work
    calibration = None
    if needs_calibration:
        t = time.perf_counter()
        set_step("calibration data")
        vocab = model.get_input_embeddings().weight.shape[0]
        calibration = load_calibration(calib_cfg, tokenizer, vocab_size=vocab, model_config=model.config)
        calib_cfg = as_used(calib_cfg, calibration)  # a token file's own shape: the record agrees with itself
        if is_token_file(calib_cfg.source):  # its windows are used as given: for block removal and weights alike
            check_context(model, tokenizer, calibration.seqlen,
                          f"the token file {Path(calib_cfg.source).name} (used as given) has windows of")
        timings["calibration_data"] = time.perf_counter() - t

    ppl_cache: dict = {}
    before = after = None
    if eval_cfg is not None and eval_cfg.datasets and eval_dense:
        t = time.perf_counter()
        set_step("perplexity of the dense model")
        before = evaluate_ppl(model, tokenizer, eval_cfg, device, ppl_cache)
        timings["eval_dense"] = time.perf_counter() - t

    block_report = None
    if block_cfg is not None:
        from .blocks import prune_blocks

        set_step("block removal")
        block_report = prune_blocks(model, block_cfg, calibration)
        timings["block_scoring"] = block_report["timings"]["scoring"]
        timings["block_total"] = block_report["timings"]["total"]
    report = None
    if prune_cfg is not None:
        set_step("pruning")
        report = prune(model, prune_cfg, calibration)
        timings.update(report.timings)
    else:
        timings["prune_total"] = block_report["timings"]["total"]
    zeros_after = zero_counts(model)

    if eval_cfg is not None and eval_cfg.datasets:
        t = time.perf_counter()
        set_step("perplexity of the pruned model")
        after = evaluate_ppl(model, tokenizer, eval_cfg, device, ppl_cache)
        timings["eval_pruned"] = time.perf_counter() - t

    evaluation = None
    if tasks:
        from .evaluation.harness import evaluate, results_markdown

        t = time.perf_counter()
        set_step("evaluation of the pruned model")
        evaluation = evaluate(model, tokenizer, tasks, seqlen=eval_cfg.seqlen if eval_cfg else calib_cfg.seqlen,
                              limit=limit, device=device, data_dir=calib_cfg.data_dir,
                              max_windows=eval_cfg.max_windows if eval_cfg else None,
                              bos=eval_cfg.bos if eval_cfg else calib_cfg.bos,
                              logits_budget_mb=eval_cfg.logits_budget_mb if eval_cfg else None)
        evaluation["table"] = results_markdown([(_label(prune_cfg, block_cfg), evaluation)])
        timings["eval_tasks"] = time.perf_counter() - t

    set_step("building the record")
    save_to = resolve_save_dtype(save_dtype, loaded, next(model.parameters()).dtype)
    record = JobRecord(
        model=loaded.source,
        architecture=type(model).__name__,
        config=JobConfig(prune=prune_cfg.to_dict() if prune_cfg else None,
                         blocks=block_cfg.to_dict() if block_cfg else None, calibration=calib_cfg.to_dict(),
                         eval=eval_cfg.to_dict() if eval_cfg else None, dtype=dtype_label(next(model.parameters()).dtype),
                         save_dtype=dtype_label(save_to)),
        calibration=calibration.to_dict() if calibration is not None else None,
        seed=calib_cfg.seed,
        versions=package_versions(),
        device=str(device),
        gguf={**loaded.gguf, "from_cache": loaded.from_cache} if loaded.gguf else None,
        blocks=block_report,
        sparsity=report.sparsity if report else zeros_after["block_linear"],  # zeros of the blocks' linear weights
        model_sparsity=zeros_after["model"],  # zeros of all parameters, embeddings included, tied ones once
        zeros_before=zeros_before,
        zeros_after=zeros_after,
        resolved=_resolved(prune_cfg, calib_cfg, eval_cfg if after is not None else None, calibration, evaluation),
        layer_sparsity=report.layer_sparsity if report else {},
        timings=timings,
        block_timings=report.block_timings if report else [],
        peak_memory=report.peak_memory if report else None,
        perplexity=Perplexity(dense=before, pruned=after),
        evaluation=evaluation,
    )
    from .export.provenance import portable_record, scrub_folder

    portable, scrubber = portable_record(record.to_dict(), loaded.source, output_dir=output_dir, base_model=base_model,
                                         license=license, data_dirs=[calib_cfg.data_dir, eval_cfg and eval_cfg.data_dir])
    record = JobRecord.from_dict(portable)
    if output_dir:
        t = time.perf_counter()
        set_step("saving")
        files = {"llmprune.json": record.to_dict()}
        if evaluation is not None:
            files["results.json"] = {"model": record.model, "pruning": record.config.to_dict(),
                                     "resolved": record.resolved.to_dict(), "results": record.evaluation,
                                     "versions": record.versions}

        def extra(folder: Path) -> None:
            from .export import write_card

            write_card(folder, record)  # README.md: the model card
            if evaluation is not None:
                from .evaluation.harness import results_header

                title = f"Evaluation of {record.model} after {_label(prune_cfg, block_cfg)}"
                head = results_header(title, [record.evaluation], limit=limit,
                                      max_windows=eval_cfg.max_windows if eval_cfg else None)
                (folder / "results.md").write_text(head + record.evaluation["table"] + "\n")
            if block_report is not None:
                from .blocks import plot_block_scores

                plot_block_scores(block_report, folder / "block_scores.png")

        cast_for_save_(model, save_to)  # the model's last use: cast in place

        def extra_then_scrub(folder: Path) -> None:  # every file of the folder, whoever wrote it
            extra(folder)
            scrubber.add(folder, Path(output_dir).expanduser().absolute().name)
            scrub_folder(folder, scrubber)

        path = save_pretrained_atomic(model, tokenizer, output_dir, files, overwrite=overwrite, extra=extra_then_scrub,
                                      reservation=reservation)
        record = record.with_output_dir(str(Path(path)))
        log.info("saved in %.1f s", time.perf_counter() - t)
    return record


def _resolved(prune_cfg, calib_cfg, eval_cfg, calibration, evaluation) -> dict:
    """What the config left to defaults, as used: the comparison group, the data folders read ("hub" for the
    Hub), the context length of the zero-shot requests. Only what applies to this job."""
    from .calibration.data import NAMED_SOURCES

    out: dict = {}
    if prune_cfg is not None:
        out["comparison_group"] = prune_cfg.effective_group
        out["selection_rule"] = prune_cfg.selection_rule
    dirs = {}
    if calibration is not None and calib_cfg.source in NAMED_SOURCES:
        dirs["calibration"] = _data_dir_label(calib_cfg.data_dir)
    if eval_cfg is not None:
        dirs["eval"] = _data_dir_label(eval_cfg.data_dir)
    if evaluation is not None:
        dirs["tasks"] = evaluation["data_dir"]
    out["data_dir"] = dirs
    if evaluation is not None and evaluation.get("zero_shot"):
        out["zero_shot_max_length"] = evaluation["zero_shot"]["max_length"]
    return out


def _label(prune_cfg, block_cfg) -> str:
    parts = []
    if block_cfg is not None:
        parts.append(f"{block_cfg.method} -{block_cfg.num_blocks if block_cfg.num_blocks is not None else block_cfg.ratio}")
    if prune_cfg is not None:
        parts.append(f"{prune_cfg.method} {prune_cfg.pattern_spec.name}")
    return " + ".join(parts)


# ---------------------------------------------------------------- evaluation and sweeps

def _place_for_eval(model, device: torch.device) -> None:
    """Move the whole model to `device` for evaluation, refusing clearly when it can't fit."""
    if device.type == "cuda":
        need = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            raise LLMPruneError(
                f"the model's weights ({need / 2**30:.1f} GiB) don't fit in {device}'s free memory "
                f"({free / 2**30:.1f} GiB); use a smaller --dtype or --device cpu"
            )
    model.to(device)


@named_steps
def run_eval_job(model_spec: str | None, tasks, *, seqlen: int = 2048, batch_size="auto", limit: int | None = None,
                 device: str = "auto", dtype: str = "auto", data_dir=None, max_windows: int | None = None,
                 output_dir: str | None = None, compile: bool = False, sparse_kernels: bool = False,
                 bos: str = "auto", cache_dir: str | None = None, use_cache: bool = True,
                 logits_budget_mb: float | None = None, overwrite: bool = False) -> dict:
    """Load a model (pruned folder, Hub id, GGUF), evaluate it, and write results.json + results.md (an existing
    one is replaced only with `overwrite`).

    `sparse_kernels`: run the 2:4 layers on sparse tensor cores where that is faster (`accelerate_2of4_`, GPU,
    bf16/fp16); its report is recorded, and without a usable GPU backend nothing changes and the reason is.
    `bos`: the BOS policy of the perplexity windows and zero-shot requests (auto, always, never)."""
    from .evaluation.compression import compression_report
    from .evaluation.harness import check_eval_counts, evaluate, results_header, results_markdown, split_tasks
    from .reporting import write_json

    set_step("checking the options")

    if compile and sparse_kernels:
        raise LLMPruneError("--compile with --sparse-kernels is not supported yet (the sparse kernels are not "
                            "checked under torch.compile); use one of them")
    ppl_tasks = split_tasks(tasks)[0]  # unknown names fail before the model loads
    check_eval_counts(limit, max_windows)
    from .bos import check_bos_policy

    check_bos_policy(bos)
    if output_dir:  # a folder that can be written, before the model loads
        if Path(output_dir).suffix in (".json", ".md") and not Path(output_dir).is_dir():
            raise LLMPruneError(f"--output-dir is a folder (results.json and results.md are written into it), "
                                f"not a file name: {output_dir}")
        check_writable(output_dir, "results folder")
        check_results_free(output_dir, ("results.json", "results.md"), overwrite)
    dev = resolve_device(device)
    set_step("loading the model")
    loaded = load_model(model_spec, resolve_dtype(dtype, dev), cache_dir=cache_dir, use_cache=use_cache)
    model = loaded.model
    if ppl_tasks:  # before any work: windows no longer than the model's context
        check_context(model, loaded.tokenizer, seqlen, "--eval-seqlen")
    prune_record = None
    if model_spec and (Path(model_spec) / "llmprune.json").is_file():
        import json

        prune_record = json.loads((Path(model_spec) / "llmprune.json").read_text()).get("config")
    _place_for_eval(model, dev)
    compression = compression_report(model, seqlen=seqlen)  # before any layer becomes a sparse-kernel module
    sparse24 = None
    if sparse_kernels:
        from .accelerate import accelerate_2of4_

        rep = accelerate_2of4_(model, device=dev)
        sparse24 = {k: rep.get(k) for k in ("status", "reason", "layers", "memory", "backends_available",
                                            "backends_unavailable", "token_counts")}
        if rep.get("status") != "converted":
            log.warning("2:4 sparse kernels not used: %s", rep.get("reason"))
    t = time.perf_counter()
    set_step("evaluation")
    res = evaluate(model, loaded.tokenizer, tasks, seqlen=seqlen, batch_size=batch_size, limit=limit, device=dev,
                   data_dir=data_dir, max_windows=max_windows, compile=compile, bos=bos,
                   logits_budget_mb=logits_budget_mb)
    record = {"model": loaded.source, "architecture": type(model).__name__, "pruning": prune_record,
              "results": res, "compression": compression, "sparse_kernels": sparse24,
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "limit": limit,
              "wall_seconds": time.perf_counter() - t, "versions": package_versions()}
    record["compression"].pop("layers", None)
    record["table"] = results_markdown([(Path(loaded.source).name or loaded.source, res)])
    from .export.provenance import portable_record

    record, _ = portable_record(record, loaded.source, data_dirs=[data_dir], output_dir=output_dir, with_license=False)
    if output_dir:
        out = Path(output_dir)
        head = results_header(f"Evaluation of {record['model']}", [record["results"]], limit=limit,
                              max_windows=max_windows)
        set_step("saving")
        with output_errors(out):
            write_json(out / "results.json", record)
            write_text_atomic(out / "results.md", head + record["table"] + "\n")
        record["output_dir"] = str(out)
    return record


def run_sweep(model_spec: str | None, methods, sparsities, patterns, calib_cfg: CalibrationConfig, tasks, *,
              output_dir: str = "sweep", overwrite: bool = False, **job) -> dict:
    """`_run_sweep` with `output_dir` checked and locked before any work, for the whole run (llmprune.outputs)."""
    with reserve_output_dir(output_dir, overwrite) as reservation:
        return _run_sweep(model_spec, methods, sparsities, patterns, calib_cfg, tasks, output_dir=output_dir,
                          overwrite=overwrite, reservation=reservation, **job)


@named_steps
def _run_sweep(model_spec: str | None, methods, sparsities, patterns, calib_cfg: CalibrationConfig, tasks, *,
               eval_seqlen: int, max_windows: int | None = None, limit: int | None = None, device: str = "auto",
               dtype: str = "auto", output_dir: str = "sweep", overwrite: bool = False, cache_dir: str | None = None,
               use_cache: bool = True, reservation=None, selection: str = "exact") -> dict:
    """Prune and evaluate every (method, pattern, sparsity) point from one dense copy; one results file, a
    table and plots. Calibration windows and evaluation texts are loaded once and shared by all points. The BOS
    policy `calib_cfg.bos` applies to calibration and evaluation alike."""
    import copy

    from .evaluation.harness import check_eval_counts, evaluate, results_header, split_tasks
    from .reporting import plot_layer_sparsity, plot_ppl_vs_sparsity, ppl_table, write_json

    set_step("checking the options")
    out = reservation.path if reservation is not None else check_output_dir(output_dir, overwrite)
    ppl_tasks = split_tasks(tasks)[0]
    check_eval_counts(limit, max_windows)
    for what, given in (("method", methods), ("pattern", patterns)):
        if not list(given):
            raise LLMPruneError(f"no {what} given: a sweep needs at least one (--{what}s)")
    if "unstructured" in patterns and not list(sparsities):
        raise LLMPruneError("no sparsity given for the unstructured pattern (--sparsities)")
    points = []
    for method in methods:
        SCORERS.get(method)
        for pattern in patterns:
            for s in (sparsities if pattern == "unstructured" else [None]):
                PruneConfig(method=method, pattern=pattern, sparsity=s, selection=selection)  # validate up front
                points.append((method, pattern, s))
    dev = resolve_device(device)
    set_step("loading the model")
    loaded = load_model(model_spec, resolve_dtype(dtype, dev), cache_dir=cache_dir, use_cache=use_cache)
    dense_model, tok = loaded.model, loaded.tokenizer
    from .calibration.data import as_used, is_token_file

    needs_calibration = any(SCORERS.get(m).needs_calibration() for m in methods)
    if ppl_tasks:  # before any work: windows no longer than the model's context
        check_context(dense_model, tok, eval_seqlen, "--eval-seqlen")
    if needs_calibration and not is_token_file(calib_cfg.source):
        check_context(dense_model, tok, calib_cfg.seqlen, "--seqlen")
    calibration = None
    if needs_calibration:
        set_step("calibration data")
        calibration = load_calibration(calib_cfg, tok, vocab_size=dense_model.get_input_embeddings().weight.shape[0],
                                       model_config=dense_model.config)
        calib_cfg = as_used(calib_cfg, calibration)
    set_step("evaluation of the dense model")
    records = [{"method": "dense", "pattern": "unstructured", "sparsity": 0.0,
                "results": evaluate(dense_model, tok, tasks, seqlen=eval_seqlen, limit=limit, device=dev,
                                    data_dir=calib_cfg.data_dir, max_windows=max_windows, bos=calib_cfg.bos)}]
    for method, pattern, s in points:
        set_step(f"{method} {pattern}" + (f" {s:g}" if s is not None else ""))
        model = copy.deepcopy(dense_model)
        cfg = PruneConfig(method=method, pattern=pattern, sparsity=s, device=device, selection=selection)
        rep = prune(model, cfg, calibration)
        res = evaluate(model, tok, tasks, seqlen=eval_seqlen, limit=limit, device=dev, data_dir=calib_cfg.data_dir,
                       max_windows=max_windows, bos=calib_cfg.bos)
        records.append({"method": method, "pattern": pattern, "sparsity": rep.sparsity if s is None else s,
                        "measured_sparsity": rep.sparsity, "group": cfg.effective_group, "prune_seconds": rep.timings["prune_total"],
                        "selection_rule": cfg.selection_rule, "layer_sparsity": rep.layer_sparsity, "results": res})
        del model
    for r in records:
        r["ppl"] = {k: v["ppl"] for k, v in r["results"]["perplexity"].items()}
    data = {"model": loaded.source, "calibration": calibration.to_dict() if calibration else None,
            "config": {"methods": list(methods), "sparsities": list(sparsities), "patterns": list(patterns),
                       "tasks": list(tasks), "eval_seqlen": eval_seqlen, "max_windows": max_windows, "limit": limit,
                       "selection": selection, "calibration": calib_cfg.to_dict()},
            "resolved": {"data_dir": _data_dir_label(calib_cfg.data_dir)},
            "records": records, "versions": package_versions()}
    from .export.provenance import portable_record

    data, _ = portable_record(data, loaded.source, data_dirs=[calib_cfg.data_dir], output_dir=output_dir,
                              with_license=False)
    table = ppl_table(records) if any(r["ppl"] for r in records) else ""
    head = results_header(f"Sweep of {data['model']}: perplexity by method and sparsity",
                          [r["results"] for r in data["records"]], limit=limit, max_windows=max_windows,
                          zero_shot_where="per point in sweep.json")
    files = {"json": "sweep.json", "table": "sweep.md"}
    if any(r["ppl"] for r in records):
        ds = next(iter(records[0]["ppl"]))
        files["plot_ppl"] = f"ppl_vs_sparsity_{ds}.png"
    last = next((r for r in reversed(records) if r.get("layer_sparsity")), None)
    if last is not None:
        files["plot_layers"] = "layer_sparsity.png"
        point = f"{last['method']} {last['pattern']}"
        point += f" {last['sparsity']:g}" if last["pattern"] == "unstructured" else ""

    def write(folder: Path) -> None:  # into a temporary sibling, put in place whole at the end
        write_json(folder / files["json"], data)
        (folder / files["table"]).write_text(head + table + "\n")
        if "plot_ppl" in files:
            plot_ppl_vs_sparsity(records, folder / files["plot_ppl"], dataset=ds)
        if "plot_layers" in files:
            plot_layer_sparsity(last["layer_sparsity"], folder / files["plot_layers"], title=point)

    set_step("saving")
    write_output_dir(out, write, overwrite=overwrite, reservation=reservation, what="the sweep results")
    data["files"], data["table"] = {k: str(out / v) for k, v in files.items()}, table
    return data
