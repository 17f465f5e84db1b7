"""Command line: argparse -> typed configs -> the same functions the Python API offers. Only this module prints.

    python -m llmprune --model <hf-id|dir|file.gguf> --method wanda --sparsity 0.5 --output-dir out/
    python -m llmprune eval|sweep|push|reproduce ...       python -m llmprune --help

Every subcommand spells the same thing the same way (`--output-dir`, `--tasks`, `--eval-seqlen`,
`--eval-max-windows`); older spellings stay as aliases (see README). Bad input is one line and exit code 2; an
unexpected error is one line naming the step it came from and exit code 1 (`--debug` or LLMPRUNE_DEBUG=1: the
traceback too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .config import SELECTIONS
from .errors import LLMPruneError

SUBCOMMANDS = ("prune", "eval", "sweep", "push", "reproduce")
_COMMAND_SCOPE = contextlib.ExitStack()  # what _configure_logging sets up for one command; main() undoes it
COMMAND_HELP = {
    "prune": "prune a model, report perplexity before and after, save it (the default: options alone run it)",
    "eval": "evaluate a model: perplexity (the papers' protocol) and lm-eval zero-shot accuracy",
    "sweep": "prune and evaluate over methods, sparsities and patterns: one table and plots",
    "push": "upload a pruned folder with its model card to the Hugging Face Hub (or stage it: --dry-run)",
    "reproduce": "run a paper table's recipes and compare the results with the paper's numbers",
}
DEBUG_ENV = "LLMPRUNE_DEBUG"
log = logging.getLogger(__name__)


def package_version() -> str:
    """The installed package's version (its metadata), else the checkout's `llmprune.__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmprune")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _shown(default) -> str:
    if default is None:
        return "none"
    if isinstance(default, (tuple, list)):
        return ",".join(map(str, default)) or "none"
    return str(default)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (flags are off by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.nargs != 0 and action.default is not argparse.SUPPRESS
                and "default" not in text and text != argparse.SUPPRESS):
            text += f" (default: {_shown(action.default)})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2 (with a did-you-mean for a misspelled option),
    shows every option's default, and takes --debug."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"print the traceback of an unexpected error (also {DEBUG_ENV}=1)")

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            import difflib

            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1) if arg.startswith("--") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        raise LLMPruneError(message)


class _Store(argparse.Action):
    """Store the value; a spelling listed in `deprecated` still works for one release, with a warning naming the
    option's first spelling."""

    def __init__(self, option_strings, dest, deprecated=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated = tuple(deprecated)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            _deprecation(namespace, option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def _deprecation(namespace, old: str, new: str) -> None:
    notes = getattr(namespace, "_deprecations", [])
    notes.append(f"warning: {old} is deprecated and goes in the next release; use {new}")
    setattr(namespace, "_deprecations", notes)


def _parse(p: argparse.ArgumentParser, argv: list[str]):
    """Parse, set up logging, and log the deprecation warnings of the spellings used."""
    a = p.parse_args(argv)
    _configure_logging(a.quiet)
    for note in getattr(a, "_deprecations", ()):
        log.warning(note)
    return a


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return n


def _positive_int_or_all(v: str):
    if v.strip().lower() in ("all", "none"):
        return None
    try:
        return _positive_int(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or all, got {v!r}") from None


def _folder(v: str) -> str:
    if not v.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty name")
    return v


def _names(v: str) -> tuple[str, ...]:
    """A comma-separated list that must name at least one thing (an empty one would do nothing)."""
    names = _csv(v)
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of one or more values, got {v!r}")
    return names


NSAMPLES_HELP = "calibration windows (default {}; a token file: its own rows, used as given)"
SEQLEN_HELP = "calibration window length in tokens (default {}; a token file: its own, used as given)"
BOS_HELP = ("BOS policy of calibration and perplexity windows and zero-shot requests: auto (BOS on every window for "
            "models that need it, e.g. Gemma; else the papers' single stream), always, never (default auto)")


SELECTION_HELP = ("mask selection: exact (default: exactly int(sparsity x size) weights per comparison group) or "
                  "reference (the reference code's rule: per-layer every score <= the k-th smallest, ties included; "
                  "per-row a stable sort; N:M torch.topk)")


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

    p = _Parser(prog="python -m llmprune [prune]", description="Prune a causal LM, report perplexity before and after, "
                "save it. `prune` is the default command: options alone run it.")
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
    g.add_argument("--selection", default="exact", choices=SELECTIONS, help=SELECTION_HELP)
    from .options import add_option_flags

    add_option_flags(g, _method_options())  # --<method>-<option>, generated from each scorer's Options
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="calibration windows per block forward (default: ~16k tokens)")
    g.add_argument("--offload-activations", default="auto", help="auto, cpu or device: where calibration activations live")
    g.add_argument("--compile-calibration", default="auto", choices=("auto", "on", "off"),
                   help="run the calibration passes through torch.compile (auto: on CUDA for jobs of over 2 PFLOP, "
                        "where the one-time compile pays off)")
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
    g.add_argument("--nsamples", type=_positive_int, default=None, help=NSAMPLES_HELP.format(128))
    g.add_argument("--seqlen", type=_positive_int, default=None, help=SEQLEN_HELP.format(2048))
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration window draws")
    g.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the Hub)")
    g.add_argument("--allow-overlap", action="store_true", help="accept less calibration text than nsamples x seqlen tokens")
    g.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-ppl", type=_csv, default=("wikitext2",), help="comma-separated: wikitext2, c4, or none (default wikitext2)")
    g.add_argument("--eval-seqlen", type=_positive_int, default=None, help="perplexity window (default: --seqlen)")
    g.add_argument("--eval-max-windows", "--max-windows", dest="eval_max_windows", type=_positive_int_or_all,
                   default=None, help="perplexity: only the first N windows (default: all)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=1, help="perplexity windows per forward")
    g.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the model before pruning")
    g.add_argument("--tasks", "--eval", dest="tasks", type=_csv, default=(),
                   help="also evaluate the pruned model on these tasks into results.json (perplexity and lm-eval "
                        "zero-shot names, see `eval --help`; default: none)")
    g.add_argument("--limit", type=_positive_int, default=None, help="zero-shot examples per task (default: all)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=_folder, default=None,
                   help="save the pruned model here: safetensors, tokenizer, llmprune.json, model card (default: not saved)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    g.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="dtype of the saved weights (default auto: the checkpoint's own, e.g. a GGUF's F16/BF16, "
                        "bfloat16 for a quantized GGUF, a model folder's config dtype)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the saved folder (with a model card) to the Hub (default: no upload)")
    g.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    g.add_argument("--revision", default=None, help="with --push-to-hub: the branch to push to (default: main)")
    g.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="the Hub id of a local model, recorded and named as the card's base_model")
    g.add_argument("--license", default=None, metavar="ID",
                   help="the base model's license for the card (default: read from the model where known)")
    g.add_argument("--json", action="store_true", help="print the full record as JSON")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    return p


def _method_options() -> list[tuple[str, type]]:
    from .scorers import SCORERS

    return [(m, SCORERS.get(m).Options) for m in SCORERS.names()]


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

    a = _parse(build_prune_parser(), argv)
    nsamples, seqlen = _calibration_shape(a.calib_data, a.nsamples, a.seqlen, 128, 2048)
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
    from .options import options_from_args

    prune_cfg = None if is_block else PruneConfig(
        method=a.method, sparsity=a.sparsity, pattern=a.pattern, comparison_group=a.comparison_group,
        **options_from_args(a, a.method, _method_options()),
        device=a.device, batch_size=a.batch_size, offload_activations=a.offload_activations,
        selection=a.selection, compile=a.compile_calibration)
    calib_cfg = CalibrationConfig(source=a.calib_data, nsamples=nsamples, seqlen=seqlen, seed=a.seed,
                                  data_dir=a.data_dir, allow_overlap=a.allow_overlap, bos=a.bos)
    eval_cfg = None
    if a.eval_ppl or a.tasks:  # the evaluation options hold for --tasks too, with --eval-ppl none
        from .evaluation.perplexity import PPL_DATASETS
        from .registry import unknown_name_message

        for name in a.eval_ppl:
            if name not in PPL_DATASETS:
                raise LLMPruneError(unknown_name_message("perplexity dataset", name, list(PPL_DATASETS)))
        eval_cfg = EvalConfig(datasets=a.eval_ppl, seqlen=a.eval_seqlen or seqlen, max_windows=a.eval_max_windows,
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


def _calibration_shape(source: str, nsamples: int | None, seqlen: int | None, default_n: int,
                       default_len: int) -> tuple[int, int]:
    """--nsamples and --seqlen as used: a token file is used as given, so its own shape (read now, before the
    model loads: a file with no windows fails here), and a --nsamples or --seqlen that contradicts it is refused;
    other sources take the values given or the defaults."""
    from .calibration.data import is_token_file, load_token_file

    if not is_token_file(source):
        return nsamples or default_n, seqlen or default_len
    path = Path(source).expanduser()
    if not path.is_file():
        raise LLMPruneError(f"calibration token file not found: {path}")
    n, length = load_token_file(path).shape
    for option, given, own in (("--nsamples", nsamples, n), ("--seqlen", seqlen, length)):
        if given is not None and given != own:
            raise LLMPruneError(f"{option} {given} contradicts the token file {source}, which is used as given: it "
                                f"holds {n} windows of {length} tokens; leave {option} out or give {option} {own}")
    return int(n), int(length)


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
    p.add_argument("--model", default=None,
                   help="pruned output folder, Hub id, local folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")
    p.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the Hub)")
    _add_cache_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")


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


def _add_eval_options(p, *, tasks: tuple[str, ...], eval_seqlen: int | None, max_windows: int | None,
                      seqlen_alias: bool) -> None:
    """The evaluation options as `prune` spells them, shared by `eval` and `sweep` (`--seqlen` stays an alias of
    `--eval-seqlen` on `eval` only: elsewhere it is the calibration window)."""
    from .evaluation.harness import known_tasks

    p.add_argument("--tasks", "--eval", dest="tasks", type=_names, default=tasks,
                   help=f"comma-separated, of: {', '.join(known_tasks())} (lm-eval's names, e.g. wikitext, "
                        "lambada_openai, are accepted too)")
    p.add_argument(*(("--eval-seqlen", "--seqlen") if seqlen_alias else ("--eval-seqlen",)), dest="eval_seqlen",
                   type=_positive_int, default=eval_seqlen,
                   help="perplexity window in tokens" + ("" if eval_seqlen else " (default: --seqlen)"))
    p.add_argument("--eval-max-windows", "--max-windows", dest="eval_max_windows", type=_positive_int_or_all,
                   default=max_windows, help="perplexity: only the first N windows, or all"
                   + ("" if max_windows else " (default: all)"))
    p.add_argument("--limit", type=_positive_int, default=None, help="zero-shot examples per task (default: all)")


def build_eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune eval", description="Evaluate a model: perplexity and zero-shot accuracy.")
    _add_common(p)
    _add_eval_options(p, tasks=("wikitext2",), eval_seqlen=2048, max_windows=None, seqlen_alias=True)
    p.add_argument("--batch-size", "--eval-batch-size", dest="batch_size", type=_positive_int_or_auto, default="auto",
                   help="perplexity windows (and zero-shot requests) per forward: a number or auto")
    p.add_argument("--logits-budget-mb", type=_positive_mb, default=None,
                   help="perplexity: MiB of float32 logits computed at once (default: 256 on CPU, a quarter of free GPU memory up to 2048)")
    p.add_argument("--output-dir", "--output", dest="output_dir", type=_folder, default=None, action=_Store,
                   deprecated=("--output",), help="folder for results.json and results.md (default: not saved)")
    p.add_argument("--overwrite", action="store_true", help="replace results.json/results.md already in --output-dir")
    p.add_argument("--compile", action="store_true", help="compile each Transformer block for perplexity (GPU; ~5 s once at 7B, pays off on long runs)")
    p.add_argument("--sparse-kernels", action="store_true",
                   help="run 2:4 layers on sparse tensor cores where measured faster (GPU, bf16/fp16; cuSPARSELt)")
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    return p


def cmd_eval(argv: list[str]) -> int:
    from .pipeline import run_eval_job

    a = _parse(build_eval_parser(), argv)
    rec = run_eval_job(a.model, a.tasks, seqlen=a.eval_seqlen, batch_size=a.batch_size, limit=a.limit,
                       device=a.device, dtype=a.dtype, data_dir=a.data_dir, max_windows=a.eval_max_windows,
                       output_dir=a.output_dir, compile=a.compile, sparse_kernels=a.sparse_kernels, bos=a.bos,
                       cache_dir=a.cache_dir, use_cache=not a.no_cache, logits_budget_mb=a.logits_budget_mb,
                       overwrite=a.overwrite)
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


SWEEP_DESCRIPTION = """Prune and evaluate over methods x patterns x sparsities, each point from one dense copy, with
calibration windows and evaluation texts loaded once; writes sweep.json, sweep.md and plots into --output-dir.
The defaults are a first look: 2 methods x 3 sparsities (6 prunes and 7 perplexity runs), 32 calibration windows
of 512 tokens, perplexity on the first 32 windows of 512: the size of the README's CPU quality table for the
default model. The papers' setting: --methods magnitude,wanda,ria,sparsegpt --sparsities
0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8 --nsamples 128 --seqlen 2048 --eval-max-windows all (32 full-size runs)."""


def build_sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune sweep", description=SWEEP_DESCRIPTION)
    _add_common(p)
    p.add_argument("--methods", type=_names, default=("magnitude", "wanda"),
                   help="comma-separated weight methods: magnitude, wanda, ria, sparsegpt")
    p.add_argument("--sparsities", type=_names, default=("0.3", "0.5", "0.7"),
                   help="comma-separated sparsities in [0, 1), for the unstructured pattern")
    p.add_argument("--patterns", type=_names, default=("unstructured",),
                   help="comma-separated: unstructured and/or N:M patterns (2:4, 4:8: their sparsity is N/M's)")
    _add_eval_options(p, tasks=("wikitext2",), eval_seqlen=None, max_windows=32, seqlen_alias=False)
    p.add_argument("--calib-data", default="c4",
                   help="c4, wikitext2, a .txt/.jsonl/.parquet file, or a .pt/.safetensors/.npy token tensor")
    p.add_argument("--nsamples", type=_positive_int, default=None, help=NSAMPLES_HELP.format(32))
    p.add_argument("--seqlen", type=_positive_int, default=None, help=SEQLEN_HELP.format(512))
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draws")
    p.add_argument("--allow-overlap", action="store_true",
                   help="accept less calibration text than nsamples x seqlen tokens")
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"), help=BOS_HELP)
    p.add_argument("--selection", default="exact", choices=SELECTIONS, help=SELECTION_HELP)
    p.add_argument("--output-dir", type=_folder, default="sweep", help="folder for sweep.json, sweep.md and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    return p


def cmd_sweep(argv: list[str]) -> int:
    from .config import CalibrationConfig
    from .pipeline import run_sweep

    a = _parse(build_sweep_parser(), argv)
    nsamples, seqlen = _calibration_shape(a.calib_data, a.nsamples, a.seqlen, 32, 512)
    try:
        sparsities = [float(x) for x in a.sparsities]
    except ValueError:
        raise LLMPruneError(f"--sparsities must be numbers, got {','.join(a.sparsities)}") from None
    calib = CalibrationConfig(source=a.calib_data, nsamples=nsamples, seqlen=seqlen, seed=a.seed,
                              data_dir=a.data_dir, allow_overlap=a.allow_overlap, bos=a.bos)
    data = run_sweep(a.model, a.methods, sparsities, a.patterns, calib, a.tasks, eval_seqlen=a.eval_seqlen or seqlen,
                     max_windows=a.eval_max_windows, limit=a.limit, device=a.device, dtype=a.dtype,
                     output_dir=a.output_dir, overwrite=a.overwrite, cache_dir=a.cache_dir,
                     use_cache=not a.no_cache, selection=a.selection)
    print(data["table"])
    for kind, path in data["files"].items():
        print(f"{kind}: {path}")
    return 0


def build_push_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune push", description="Upload a pruned folder (with a model card) to the Hub.")
    p.add_argument("folder", help="the folder to upload (a prune --output-dir)")
    p.add_argument("repo_id", help="the Hub repository, e.g. me/smollm2-wanda50")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="the branch to push to (default: main)")
    p.add_argument("--dry-run", nargs="?", const=True, default=None, metavar="DIR",
                   help="upload nothing: write exactly what would be uploaded into --output-dir (`--dry-run DIR` is "
                        "the deprecated spelling of --dry-run --output-dir DIR; default: off)")
    p.add_argument("--output-dir", type=_folder, default=None,
                   help="with --dry-run: the new folder the staged files are written into (default: none)")
    p.add_argument("--base-model", default=None, metavar="HUB_ID", help="the card's base_model: the Hub id of the model pruned (default: as recorded)")
    p.add_argument("--license", default=None, metavar="ID", help="the card's license (default: as recorded, else `other`)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    return p


def cmd_push(argv: list[str]) -> int:
    from .export import push_folder

    a = build_push_parser().parse_args(argv)
    dry_dir = a.output_dir
    if isinstance(a.dry_run, str):  # the old spelling: --dry-run DIR
        if not a.dry_run.strip():
            raise LLMPruneError("argument --dry-run: expected a folder, got an empty name")
        if a.output_dir is not None and a.output_dir != a.dry_run:
            raise LLMPruneError(f"--dry-run {a.dry_run} and --output-dir {a.output_dir} name two folders; give "
                                "--dry-run --output-dir DIR")
        _deprecation(a, "--dry-run DIR", "--dry-run --output-dir DIR")
        dry_dir = a.dry_run
    elif a.dry_run and dry_dir is None:
        raise LLMPruneError("--dry-run needs --output-dir DIR: the new folder the staged files are written into")
    elif not a.dry_run and dry_dir is not None:
        raise LLMPruneError("--output-dir goes with --dry-run (a push writes nothing locally); add --dry-run")
    _configure_logging(a.quiet)
    for note in getattr(a, "_deprecations", ()):
        log.warning(note)
    res = push_folder(a.folder, a.repo_id, private=a.private, revision=a.revision, dry_run_dir=dry_dir,
                      base_model=a.base_model, license=a.license)
    if res.get("card") is None:
        print(f"note: {a.folder} has no llmprune.json and no README.md: it goes up without a model card")
    if dry_dir:
        print(f"dry run: {len(res['files'])} files that would be uploaded to {a.repo_id} are in {res['dry_run']}")
        if not res.get("token_found"):
            print("note: no Hugging Face token found; a real push needs HF_TOKEN or `hf auth login`")
    else:
        print(f"pushed {len(res['files'])} files: {res['url']}")
    return 0


def build_reproduce_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune reproduce", description="Run a paper table's recipes and compare with the paper.")
    p.add_argument("table", help="a recipe folder or file, e.g. recipes/paper/wanda_llama2")
    p.add_argument("--output-dir", "--out-dir", dest="output_dir", type=_folder, default="reproduce", action=_Store,
                   deprecated=("--out-dir",), help="folder for results.json and comparison.md")
    p.add_argument("--data-dir", default=None, help="local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the Hub)")
    p.add_argument("--strict", action="store_true", help="fail when a cell's model can't be loaded (default: skip it)")
    p.add_argument("--overwrite", action="store_true", help="replace results.json/comparison.md already in --output-dir")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    return p


def cmd_reproduce(argv: list[str]) -> int:
    from .reproduce import reproduce

    a = _parse(build_reproduce_parser(), argv)
    res = reproduce(a.table, out_dir=a.output_dir, data_dir=a.data_dir, only_available=not a.strict,
                    overwrite=a.overwrite)
    print(res["markdown"])
    print(f"results: {res['results']}\ncomparison: {res['comparison']}")
    return 0


def top_level_help() -> str:
    """`python -m llmprune --help`: the commands, one line each."""
    width = max(map(len, SUBCOMMANDS))
    return "\n".join([
        "usage: python -m llmprune [COMMAND] [OPTIONS]",
        "",
        "Post-training pruning of causal LMs (magnitude, Wanda, RIA, SparseGPT, block removal), evaluated in the",
        "papers' protocol.",
        "",
        "commands:",
        *(f"  {c:<{width}}  {COMMAND_HELP[c]}" for c in SUBCOMMANDS),
        "",
        "Options alone run prune, e.g. python -m llmprune --method wanda --sparsity 0.5 --output-dir out/",
        "python -m llmprune COMMAND --help lists a command's options with their defaults.",
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "  --version   show the version and exit",
        f"  --debug     print the traceback of an unexpected error (also {DEBUG_ENV}=1)",
    ])


def _unknown_command(word: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (f"unknown command '{word}'{hint}; commands: {', '.join(SUBCOMMANDS)} (options alone run prune; "
            "see python -m llmprune --help)")


def _unexpected_error(e: BaseException, debug: bool) -> int:
    """An exception no check foresaw: one line naming the step it came from (llmprune.errors.step), its type and
    message; with `debug` the traceback first. Exit code 1: not the user's input, a failure to report."""
    import traceback

    from .errors import failed_step, summary

    if debug:
        traceback.print_exception(e, file=sys.stderr)
    where = failed_step(e)
    message = f"{type(e).__name__}: {summary(e)}" if str(e).strip() else type(e).__name__
    print(f"llmprune: error: {where + ': ' if where else ''}{message}"
          + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    first = argv[0] if argv else None
    if first in ("-h", "--help") or argv == ["help"]:
        print(top_level_help())
        return 0
    if first == "--version":
        print(f"llmprune {package_version()}")
        return 0
    if first == "help":  # help COMMAND
        argv = [argv[1], "--help", *argv[2:]]
        first = argv[0]
    cmd = argv[0] if argv and argv[0] in SUBCOMMANDS else "prune"
    if argv and argv[0] == cmd:
        argv = argv[1:]
    try:
        if first is not None and not first.startswith("-") and first not in SUBCOMMANDS:
            raise LLMPruneError(_unknown_command(first))  # a bare word is a command, never prune's input
        return {"prune": cmd_prune, "eval": cmd_eval, "sweep": cmd_sweep, "push": cmd_push,
                "reproduce": cmd_reproduce}[cmd](argv)
    except LLMPruneError as e:
        if debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # an allocation failure outside any named step
        from .errors import allocation_detail, is_out_of_memory

        if not is_out_of_memory(e):
            return _unexpected_error(e, debug)
        detail = allocation_detail(e)
        print(f"llmprune: error: out of memory{f' ({detail})' if detail else ''}; to use less memory: a smaller "
              "--batch-size or --dtype bfloat16", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse's --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except Exception as e:  # noqa: BLE001 - one line naming the step, never a bare traceback
        return _unexpected_error(e, debug)
    finally:
        _COMMAND_SCOPE.close()  # the logging handlers and TQDM_DISABLE as they were before the command


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
