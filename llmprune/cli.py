"""Command line: argparse -> typed configs -> the same functions the Python API offers. Only this module prints.

    python -m llmprune --model <hf-id|dir|file.gguf> --method wanda --sparsity 0.5 --output-dir out/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from .errors import LLMPruneError

SUBCOMMANDS = ("prune", "eval", "sweep", "push", "reproduce")
_COMMAND_SCOPE = contextlib.ExitStack()  # what _configure_logging sets up for one command; main() undoes it


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise LLMPruneError(message)


BOS_HELP = ("BOS policy of calibration and perplexity windows and zero-shot requests: auto (BOS on every window for "
            "models that need it, e.g. Gemma; else the papers' single stream), always, never (default auto)")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")


def _positive_mb(value: str) -> float:
    try:
        mb = float(value)
    except ValueError:
        mb = float("nan")
    if not mb > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB, got {value!r}")
    return mb


def build_prune_parser() -> argparse.ArgumentParser:
    from .scorers import SCORERS

    p = _Parser(prog="python -m llmprune", description="Prune a causal LM, report perplexity before and after, save it.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")
    g.add_argument("--device", default="auto", help="where blocks are processed: auto, cpu, cuda, cuda:N")
    _add_cache_options(g)
    g = p.add_argument_group("pruning")
    from .blocks import BLOCK_SCORERS

    g.add_argument("--method", default="wanda",
                   help=f"weight method ({', '.join(SCORERS.names())}) or block method ({', '.join(BLOCK_SCORERS.names())})")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, in [0, 1) (default 0.5; implied by N:M)")
    g.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8 or any N:M with N < M")
    g.add_argument("--comparison-group", default=None, choices=None,
                   help="per-row or per-layer (default: the method's reference: magnitude per-layer, wanda per-row, ria per-layer, sparsegpt per-layer)")
    g.add_argument("--ria-alpha", type=float, default=0.5, help="RIA activation exponent a (default 0.5)")
    g.add_argument("--sparsegpt-blocksize", type=int, default=128)
    g.add_argument("--sparsegpt-percdamp", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=None, help="calibration windows per block forward (default: ~16k tokens)")
    g.add_argument("--offload-activations", default="auto", help="auto, cpu or device: where calibration activations live")
    g.add_argument("--logits-budget-mb", type=_positive_mb, default=None,
                   help="MiB of float32 logits computed at once by block-ppl/block-kl and perplexity (default: 256 on CPU, "
                        "a quarter of free GPU memory up to 2048)")
    g = p.add_argument_group("block removal")
    g.add_argument("--drop-blocks", type=int, default=None, help="number of whole blocks to remove")
    g.add_argument("--drop-ratio", type=float, default=None, help="fraction of blocks to remove, e.g. 0.25")
    g.add_argument("--block-method", default=None,
                   help="block scorer used with --drop-blocks when --method is a weight method (default block-influence)")
    g.add_argument("--protect-blocks", type=_csv, default=(), help="block indices never removed, e.g. 0,-1")
    g.add_argument("--iterative", action="store_true", help="remove one block at a time and rescore")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-data", default="c4", help="c4, wikitext2, a .txt/.jsonl/.parquet file, or a .pt/.safetensors/.npy token tensor")
    g.add_argument("--nsamples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=2048)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the Hub)")
    g.add_argument("--allow-overlap", action="store_true", help="accept less calibration text than nsamples x seqlen tokens")
    g.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-ppl", type=_csv, default=("wikitext2",), help="comma-separated: wikitext2, c4, or none (default wikitext2)")
    g.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    g.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first N windows")
    g.add_argument("--eval-batch-size", type=int, default=1)
    g.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the model before pruning")
    g.add_argument("--eval", dest="tasks", type=_csv, default=(), help="also evaluate the pruned model on these tasks (perplexity and lm-eval zero-shot names, see `eval --help`)")
    g.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None, help="save the pruned model here (safetensors + tokenizer + llmprune.json)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    g.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="dtype of the saved weights (default auto: the checkpoint's own, e.g. a GGUF's F16/BF16, "
                        "bfloat16 for a quantized GGUF, a model folder's config dtype)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the saved folder (with a model card) to the Hub")
    g.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    g.add_argument("--revision", default=None, help="with --push-to-hub: the branch to push to")
    g.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="the Hub id of a local model, recorded and named as the card's base_model")
    g.add_argument("--license", default=None, metavar="ID",
                   help="the base model's license for the card (default: read from the model where known)")
    g.add_argument("--json", action="store_true", help="print the full record as JSON")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    return p


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        old = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # our block bars too
        _COMMAND_SCOPE.callback(lambda: os.environ.__setitem__("TQDM_DISABLE", old) if old is not None
                                else os.environ.pop("TQDM_DISABLE", None))
    from .progress import logging_redirect_tqdm

    _COMMAND_SCOPE.enter_context(logging_redirect_tqdm())  # log lines print above a live bar, not into it
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" bars
        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass


def cmd_prune(argv: list[str]) -> int:
    from .config import CalibrationConfig, EvalConfig, PruneConfig
    from .pipeline import run_prune_job

    a = build_prune_parser().parse_args(argv)
    _configure_logging(a.quiet)
    from .blocks import BLOCK_SCORERS, BlockPruneConfig
    from .registry import unknown_name_message
    from .scorers import SCORERS

    is_block = a.method in BLOCK_SCORERS
    if not is_block and a.method not in SCORERS:
        raise LLMPruneError(unknown_name_message("method", a.method, SCORERS.names() + BLOCK_SCORERS.names()))
    block_cfg = None
    if is_block or a.drop_blocks is not None or a.drop_ratio is not None:
        if a.drop_blocks is None and a.drop_ratio is None:
            raise LLMPruneError(f"method {a.method} removes blocks: give --drop-blocks K or --drop-ratio R")
        try:
            protect = tuple(int(x) for x in a.protect_blocks)
        except ValueError:
            raise LLMPruneError(f"--protect-blocks takes block indices, got {','.join(a.protect_blocks)}") from None
        block_cfg = BlockPruneConfig(method=a.method if is_block else (a.block_method or "block-influence"),
                                     num_blocks=a.drop_blocks, ratio=a.drop_ratio, protect=protect,
                                     iterative=a.iterative, device=a.device, batch_size=a.batch_size,
                                     logits_budget_mb=a.logits_budget_mb)
    prune_cfg = None if is_block else PruneConfig(
        method=a.method, sparsity=a.sparsity, pattern=a.pattern, comparison_group=a.comparison_group,
        ria_alpha=a.ria_alpha, sparsegpt_blocksize=a.sparsegpt_blocksize, sparsegpt_percdamp=a.sparsegpt_percdamp,
        device=a.device, batch_size=a.batch_size, offload_activations=a.offload_activations)
    calib_cfg = CalibrationConfig(source=a.calib_data, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                                  data_dir=a.data_dir, allow_overlap=a.allow_overlap, bos=a.bos)
    eval_cfg = None
    if a.eval_ppl:
        from .evaluation.perplexity import PPL_DATASETS
        from .registry import unknown_name_message

        for name in a.eval_ppl:
            if name not in PPL_DATASETS:
                raise LLMPruneError(unknown_name_message("perplexity dataset", name, list(PPL_DATASETS)))
        eval_cfg = EvalConfig(datasets=a.eval_ppl, seqlen=a.eval_seqlen or a.seqlen, max_windows=a.eval_max_windows,
                              batch_size=a.eval_batch_size, data_dir=a.data_dir, bos=a.bos,
                              logits_budget_mb=a.logits_budget_mb)
    if a.push_to_hub and not a.output_dir:
        raise LLMPruneError("--push-to-hub needs --output-dir (the folder that is uploaded)")
    if a.push_to_hub:
        from .export.hub import _resolve_token

        if _resolve_token(None) is None:  # refuse before the work, not after it
            raise LLMPruneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or push later with "
                                "`python -m llmprune push DIR REPO_ID`)")
    record = run_prune_job(a.model, prune_cfg, calib_cfg, eval_cfg, output_dir=a.output_dir, overwrite=a.overwrite,
                           dtype=a.dtype, eval_dense=not a.skip_dense_eval, tasks=a.tasks, limit=a.limit,
                           block_cfg=block_cfg, base_model=a.base_model, license=a.license,
                           save_dtype=a.save_dtype, cache_dir=a.cache_dir, use_cache=not a.no_cache)
    pushed = None
    if a.push_to_hub:
        from .export import push_folder

        res = push_folder(record.output_dir, a.push_to_hub, private=a.private, revision=a.revision,
                          base_model=a.base_model, license=a.license)
        pushed = res.get("url")
    if a.json:
        print(json.dumps({**record.to_dict(), **({"pushed": pushed} if pushed else {})}, indent=2, default=str))
    else:
        print(format_summary(record))
        if pushed:
            print(f"pushed: {pushed}")
    return 0


def format_summary(record) -> str:
    """The prune command's summary of a job record (a `JobRecord`, or an llmprune.json dict)."""
    from .record import JobRecord

    record = JobRecord.of(record)
    cfg = record.config.prune
    lines = [f"model: {record.model} ({record.architecture})"]
    if record.blocks:
        b = record.blocks
        lines.append(f"blocks: {record.config.blocks['method']} removed {sorted(b.removed)} "
                     f"(scoring {b.timings['scoring']:.1f} s); parameters {b.params_before:,} -> {b.params_after:,}")
    if cfg:
        lines.append(f"method: {cfg['method']} {cfg['pattern']}"
                     + (f" sparsity {cfg['sparsity']}" if cfg["sparsity"] is not None else "")
                     + f" -> {100 * record.sparsity:.2f} % of block linear weights are zero" + _zeros_note(record))
    elif record.model_sparsity is not None:
        lines.append(f"zeros: {100 * record.sparsity:.2f} % of block linear weights" + _zeros_note(record))
    if record.calibration:
        c = record.calibration
        lines.append(f"calibration: {c.nsamples} x {c.seqlen} tokens, {c.description} (sha256 {c.token_sha256[:12]})")
    ppl = record.perplexity
    for name in (ppl.pruned or ppl.dense or {}):
        d = (ppl.dense or {}).get(name)
        p = (ppl.pruned or {}).get(name)
        proto = d or p
        lines.append(f"{name} perplexity (seqlen {proto['seqlen']}, {proto['windows']} windows): "
                     + (f"dense {d['ppl']:.3f}" if d else "dense -") + " -> " + (f"pruned {p['ppl']:.3f}" if p else "-"))
    t = record.timings
    lines.append(f"prune time: {t['prune_total']:.1f} s (model load {t['load_model']:.1f} s)")
    if record.evaluation:
        lines += ["", record.evaluation["table"]]
    if record.output_dir:
        lines.append(f"saved: {record.output_dir}")
    return "\n".join(lines)


def _zeros_note(record) -> str:
    """" (19.30 % of all parameters; 4.55 % were zero before pruning)": the whole model, and before pruning."""
    if record.model_sparsity is None:
        return ""
    before = record.zeros_before.block_linear if record.zeros_before else None
    return (f" ({100 * record.model_sparsity:.2f} % of all parameters"
            + (f"; {100 * before:.2f} % were zero before pruning" if before is not None else "") + ")")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pruned output folder, Hub id, local folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")
    p.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the Hub)")
    _add_cache_options(p)
    p.add_argument("-q", "--quiet", action="store_true")


def _add_cache_options(p) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="where converted GGUF files are cached (default: $LLMPRUNE_CACHE, else $HF_HOME/llmprune)")
    p.add_argument("--no-cache", action="store_true", help="convert a GGUF again; read and write no cache")


def _positive_int_or_auto(v: str):
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {v!r}")
    return n


def cmd_eval(argv: list[str]) -> int:
    from .evaluation.harness import known_tasks
    from .pipeline import run_eval_job

    p = _Parser(prog="python -m llmprune eval", description="Evaluate a model: perplexity and zero-shot accuracy.")
    _add_common(p)
    p.add_argument("--tasks", type=_csv, default=("wikitext2",), help=f"comma-separated, of: {', '.join(known_tasks())}")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity: only the first N windows")
    p.add_argument("--batch-size", type=_positive_int_or_auto, default="auto")
    p.add_argument("--logits-budget-mb", type=_positive_mb, default=None,
                   help="perplexity: MiB of float32 logits computed at once (default: 256 on CPU, a quarter of free GPU memory up to 2048)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot examples per task (default: all)")
    p.add_argument("--output", default=None, help="folder for results.json and results.md")
    p.add_argument("--compile", action="store_true", help="compile each Transformer block for perplexity (GPU; ~5 s once at 7B, pays off on long runs)")
    p.add_argument("--sparse-kernels", action="store_true",
                   help="run 2:4 layers on sparse tensor cores where measured faster (GPU, bf16/fp16; cuSPARSELt)")
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    a = p.parse_args(argv)
    _configure_logging(a.quiet)
    rec = run_eval_job(a.model, a.tasks, seqlen=a.seqlen, batch_size=a.batch_size, limit=a.limit, device=a.device,
                       dtype=a.dtype, data_dir=a.data_dir, max_windows=a.max_windows, output_dir=a.output,
                       compile=a.compile, sparse_kernels=a.sparse_kernels, bos=a.bos, cache_dir=a.cache_dir,
                       use_cache=not a.no_cache, logits_budget_mb=a.logits_budget_mb)
    c = rec["compression"]
    print(f"model: {rec['model']} ({rec['architecture']}, {c['total_params']:,} parameters, "
          f"{c['nonzero_params']:,} non-zero)")
    if a.limit:
        print(f"zero-shot: first {a.limit} examples per task")
    sk = rec.get("sparse_kernels")
    if sk:
        layers = sk.get("layers") or {}
        print(f"2:4 sparse kernels: {layers.get('replaced', 0)} of {layers.get('total', 0)} block linear layers"
              if sk["status"] == "converted" else f"2:4 sparse kernels not used: {sk['reason']}")
    print(rec["table"])
    if rec.get("output_dir"):
        print(f"saved: {rec['output_dir']}/results.json, results.md")
    return 0


def cmd_sweep(argv: list[str]) -> int:
    from .config import CalibrationConfig
    from .pipeline import run_sweep

    p = _Parser(prog="python -m llmprune sweep", description="Prune and evaluate over methods, sparsities and patterns.")
    _add_common(p)
    p.add_argument("--methods", type=_csv, default=("magnitude", "wanda", "ria", "sparsegpt"))
    p.add_argument("--sparsities", type=_csv, default=("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"))
    p.add_argument("--patterns", type=_csv, default=("unstructured",))
    p.add_argument("--tasks", type=_csv, default=("wikitext2",))
    p.add_argument("--calib-data", default="c4")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-overlap", action="store_true")
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    p.add_argument("--eval-seqlen", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--output-dir", default="sweep")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    _configure_logging(a.quiet)
    try:
        sparsities = [float(x) for x in a.sparsities]
    except ValueError:
        raise LLMPruneError(f"--sparsities must be numbers, got {','.join(a.sparsities)}") from None
    calib = CalibrationConfig(source=a.calib_data, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                              data_dir=a.data_dir, allow_overlap=a.allow_overlap, bos=a.bos)
    data = run_sweep(a.model, a.methods, sparsities, a.patterns, calib, a.tasks, eval_seqlen=a.eval_seqlen or a.seqlen,
                     max_windows=a.max_windows, limit=a.limit, device=a.device, dtype=a.dtype,
                     output_dir=a.output_dir, overwrite=a.overwrite, cache_dir=a.cache_dir,
                     use_cache=not a.no_cache)
    print(data["table"])
    for kind, path in data["files"].items():
        print(f"{kind}: {path}")
    return 0


def cmd_push(argv: list[str]) -> int:
    from .export import push_folder

    p = _Parser(prog="python -m llmprune push", description="Upload a pruned folder (with a model card) to the Hub.")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--dry-run", default=None, metavar="DIR", help="write exactly what would be uploaded into DIR; upload nothing")
    p.add_argument("--base-model", default=None, metavar="HUB_ID", help="the card's base_model: the Hub id of the model pruned")
    p.add_argument("--license", default=None, metavar="ID", help="the card's license (default: as recorded, else `other`)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    _configure_logging(a.quiet)
    res = push_folder(a.folder, a.repo_id, private=a.private, revision=a.revision, dry_run_dir=a.dry_run,
                      base_model=a.base_model, license=a.license)
    if res.get("card") is None:
        print(f"note: {a.folder} has no llmprune.json and no README.md: it goes up without a model card")
    if a.dry_run:
        print(f"dry run: {len(res['files'])} files that would be uploaded to {a.repo_id} are in {res['dry_run']}")
        if not res.get("token_found"):
            print("note: no Hugging Face token found; a real push needs HF_TOKEN or `hf auth login`")
    else:
        print(f"pushed {len(res['files'])} files: {res['url']}")
    return 0


def cmd_reproduce(argv: list[str]) -> int:
    from .reproduce import reproduce

    p = _Parser(prog="python -m llmprune reproduce", description="Run a paper table's recipes and compare with the paper.")
    p.add_argument("table", help="a recipe folder or file, e.g. recipes/paper/wanda_llama2")
    p.add_argument("--out-dir", default="reproduce")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--strict", action="store_true", help="fail when a cell's model can't be loaded (default: skip it)")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    _configure_logging(a.quiet)
    res = reproduce(a.table, out_dir=a.out_dir, data_dir=a.data_dir, only_available=not a.strict)
    print(res["markdown"])
    print(f"results: {res['results']}\ncomparison: {res['comparison']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else "prune"
    if argv and argv[0] == cmd:
        argv = argv[1:]
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "sweep": cmd_sweep, "push": cmd_push,
                "reproduce": cmd_reproduce}[cmd](argv)
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # an allocation failure outside any named step
        from .errors import allocation_detail, is_out_of_memory

        if not is_out_of_memory(e):
            raise
        detail = allocation_detail(e)
        print(f"llmprune: error: out of memory{f' ({detail})' if detail else ''}; to use less memory: a smaller "
              "--batch-size or --dtype bfloat16", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130
    finally:
        _COMMAND_SCOPE.close()  # the logging handlers and TQDM_DISABLE as they were before the command


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
