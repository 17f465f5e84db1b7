"""Zero-shot accuracy through lm-eval on an in-memory Hugging Face causal LM, fully offline.

lm-eval's built-in tasks fetch their data from the Hugging Face Hub. Here every task reads a
local file instead, while lm-eval's own prompt, answer choices, target and metrics stay in force:

* ``tasks/<name>.yaml`` (package data, next to this module) is an *overlay*: it only says where
  the documents come from (``dataset_path: json`` plus ``data_files`` relative to the data dir,
  and which split is scored). The hellaswag overlay also swaps ``process_docs``, because the local
  HellaSwag file is already pre-processed (see :func:`hellaswag_process_docs`).
* At run time a wrapper YAML per task is written into a temporary folder. It ``include:``s
  lm-eval's built-in task YAML (from the installed lm_eval package), then the overlay, and sets
  ``data_files`` to absolute paths under the data dir given at run time. lm-eval's
  ``TaskManager(include_path=<that folder>, include_defaults=False)`` loads them, and
  ``lm_eval.evaluator.evaluate`` scores the model through ``HFLM(pretrained=<model object>)``.

The data dir holds one sub-folder per task (``<data_dir>/<task>/<file>``); its files and their
provenance are described in that folder's SOURCES.md.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import yaml

from ..calibration.data import DATA_DIR_ENV, resolve_data_dir
from ..errors import LLMPruneError
from ..progress import live_bars
from .baselines import chance_rate, is_noisy, majority_share, notes

__all__ = [
    "KNOWN_TASKS",
    "DATA_DIR_ENV",
    "ZeroShotError",
    "evaluate_zero_shot",
    "hellaswag_process_docs",
    "restore_hellaswag_query",
    "task_data_files",
]

logger = logging.getLogger(__name__)

#: Folder with the overlay YAMLs (package data).
TASKS_DIR = Path(__file__).resolve().with_name("tasks")

# lm-eval aggregates perplexity's stderr by bootstrap (acc and acc_norm have closed forms). Its
# default is 100000 draws in a multiprocessing pool; 1000 draws in-process are plenty here.
_BOOTSTRAP_ITERS = 1000


class ZeroShotError(LLMPruneError):
    """A zero-shot request that cannot be run as given (unknown task, missing local data)."""


@dataclass(frozen=True)
class _TaskSpec:
    name: str  # llmprune's name
    lm_eval_task: str  # lm-eval's task name (what its results are keyed by)
    builtin_yaml: str  # lm-eval's definition, relative to the lm_eval/tasks folder
    differs_from_hub: str | None  # where the local copy is not the exact Hub split


_SPECS: tuple[_TaskSpec, ...] = (
    _TaskSpec("boolq", "boolq", "super_glue/boolq/default.yaml", None),
    _TaskSpec(
        "rte",
        "rte",
        "glue/rte/default.yaml",
        "rows are the SuperGLUE RTE validation pairs (277) renamed to GLUE fields; that GLUE RTE "
        "validation is the same 277 pairs is believed, not verified",
    ),
    _TaskSpec(
        "hellaswag",
        "hellaswag",
        "hellaswag/hellaswag.yaml",
        "built from a pre-processed copy of the 10042 validation rows (query/choices/gold; "
        "ctx_a, ctx_b, ind, source_id lost): lm-eval's ctx_b capitalisation and [..] removal "
        "are redone by heuristic, but spacing left by lm-eval's removal of WikiHow [tags] is "
        "not recoverable, so some prompts/endings may not be byte-identical to lm-eval's",
    ),
    _TaskSpec(
        "winogrande",
        "winogrande",
        "winogrande/default.yaml",
        "same 1267 rows as winogrande_xl validation but not byte-identical: the qID field is "
        "missing (lm-eval does not use it)",
    ),
    _TaskSpec("arc_easy", "arc_easy", "arc/arc_easy.yaml", None),
    _TaskSpec("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", None),
    _TaskSpec(
        "openbookqa",
        "openbookqa",
        "openbookqa/openbookqa.yaml",
        "converted from OpenBookQA Main test.tsv; byte-identity with the official release is "
        "not verified (stems, choices and answers agree 500/500 with two other copies)",
    ),
    _TaskSpec("piqa", "piqa", "piqa/piqa.yaml", None),
    _TaskSpec("lambada", "lambada_openai", "lambada/lambada_openai.yaml", None),
)

_SPEC_BY_NAME: dict[str, _TaskSpec] = {s.name: s for s in _SPECS}

#: llmprune's task names.
KNOWN_TASKS: tuple[str, ...] = tuple(s.name for s in _SPECS)

# Other spellings accepted for a task (lm-eval's names where they differ from ours).
_ALIASES: dict[str, str] = {
    s.lm_eval_task: s.name for s in _SPECS if s.lm_eval_task != s.name
}

# lm-eval messages that are expected here and only add noise: {logger: message prefixes}. The
# first two are about passing an in-memory model; the last two come from lm-eval's own boolq/rte
# YAMLs, which leave a metric's aggregation/higher_is_better to lm-eval's defaults.
_EXPECTED_LM_EVAL_MESSAGES: dict[str, tuple[str, ...]] = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": (
        "[Task: boolq] metric acc is defined, but",
        "[Task: rte] metric acc is defined, but",
    ),
}


# --------------------------------------------------------------------------- task names


def _resolve_task_names(tasks: str | Iterable[str]) -> list[str]:
    """Our names for `tasks` (a list, or one comma-separated string), in order, de-duplicated."""
    if isinstance(tasks, str):
        raw = [t for t in (p.strip() for p in tasks.split(",")) if t]
    else:
        raw = [str(t).strip() for t in tasks]
    if not raw:
        raise ZeroShotError(f"no zero-shot task given; known tasks: {', '.join(KNOWN_TASKS)}")
    names: list[str] = []
    for task in raw:
        key = task.lower()
        name = key if key in _SPEC_BY_NAME else _ALIASES.get(key)
        if name is None:
            close = difflib.get_close_matches(key, [*KNOWN_TASKS, *_ALIASES], n=1, cutoff=0.6)
            hint = f" (did you mean '{_ALIASES.get(close[0], close[0])}'?)" if close else ""
            raise ZeroShotError(
                f"unknown zero-shot task '{task}'{hint}; known tasks: {', '.join(KNOWN_TASKS)}"
            )
        if name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------- local data


class _OverlayLoader(yaml.SafeLoader):
    """Reads an overlay YAML without importing what its ``!function`` tags name."""


_OverlayLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _overlay_path(name: str) -> Path:
    return TASKS_DIR / f"{name}.yaml"


def _read_overlay(name: str) -> dict[str, Any]:
    with _overlay_path(name).open("rb") as fh:
        cfg = yaml.load(fh, Loader=_OverlayLoader)  # noqa: S506 (safe loader subclass)
    if not isinstance(cfg, dict):
        raise ValueError(f"{_overlay_path(name)} is not a YAML mapping")
    return cfg


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The zero-shot data folder (`resolve_data_dir`: `data_dir`, else $LLMPRUNE_DATA_DIR), which must exist."""
    path = resolve_data_dir(data_dir)
    if path is None:
        raise ZeroShotError(
            f"no data dir given for zero-shot evaluation: pass --data-dir or set {DATA_DIR_ENV} "
            "to the folder that holds one sub-folder per task (e.g. arc_easy/test.hf.jsonl)"
        )
    if not path.is_dir():
        raise ZeroShotError(
            f"zero-shot data dir not found: {path} (looked for this folder; pass --data-dir or "
            f"set {DATA_DIR_ENV} to the folder that holds one sub-folder per task)"
        )
    return path.resolve()


def task_data_files(name: str, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``{split: absolute path}`` of the local files task `name` reads under `data_dir`.

    Raises :class:`ZeroShotError` naming the exact path when a file is missing.
    """
    [name] = _resolve_task_names([name])
    root = _resolve_data_dir(data_dir)
    data_files = (_read_overlay(name).get("dataset_kwargs") or {}).get("data_files") or {}
    out: dict[str, Path] = {}
    for split, rel in data_files.items():
        path = root / str(rel)
        if not path.is_file():
            raise ZeroShotError(
                f"local data for zero-shot task '{name}' not found: {path} (looked for this "
                f"file; pass --data-dir or set {DATA_DIR_ENV} to the folder that holds "
                f"{Path(str(rel)).parent}/)"
            )
        out[str(split)] = path
    return out


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_16(path: Path) -> str:
    """First 16 hex digits of the file's sha256 (cached per path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()[:16]
    return _SHA_CACHE[key]


# --------------------------------------------------------------------------- hellaswag

# A sentence end inside a HellaSwag context: ".", "!" or "?", maybe closing quotes/brackets,
# then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
# lm-eval's HellaSwag preprocessing drops every "[...]"; the local copy only dropped the WikiHow
# markers ([header], [step], [substeps], [title]) and kept other bracketed text.
_BRACKETED = re.compile(r"\[.*?\]")


def _drop_bracketed(text: str) -> str:
    """Remove "[...]" spans and then one pass of double spaces, as lm-eval does.

    Only applied to strings that still hold a bracketed span, so that double spaces which
    lm-eval itself keeps are left alone elsewhere.
    """
    if not _BRACKETED.search(text):
        return text
    return _BRACKETED.sub("", text).replace("  ", " ")


def restore_hellaswag_query(query: str) -> str:
    """Rebuild lm-eval's HellaSwag prompt from a pre-processed ``activity_label: ctx`` query.

    lm-eval builds ``ctx_a + " " + ctx_b.capitalize()``; the local file kept ``ctx_a + " " + ctx_b``
    as is. ctx_b is the unfinished trailing phrase (the ActivityNet part; it is empty for most
    WikiHow rows, whose context then ends a sentence). So when the context does not end with
    ``.``, ``!`` or ``?``, the text after the last sentence end is taken as ctx_b and given
    ``str.capitalize()`` as lm-eval does (exact whenever ctx_a ends a sentence, as it should).
    Bracketed text the local copy kept is dropped as lm-eval drops it.
    """
    label, sep, ctx = query.partition(": ")
    if sep and ctx.strip() and ctx.rstrip()[-1] not in ".!?":
        ends = [m.end() for m in _SENTENCE_END.finditer(ctx)]
        start = ends[-1] if ends else 0
        query = f"{label}{sep}{ctx[:start]}{ctx[start:].capitalize()}"
    return _drop_bracketed(query)


def hellaswag_process_docs(dataset: Any) -> Any:
    """lm-eval ``process_docs`` for the local HellaSwag file (fields query, choices, gold).

    Produces the fields lm-eval's hellaswag task reads: ``query`` (see
    :func:`restore_hellaswag_query`), ``choices`` (the endings, with bracketed text dropped as
    lm-eval does) and ``label`` (the gold index, as the Hub's string label); ``gold`` is kept.
    """

    def _doc(doc: Mapping[str, Any]) -> dict[str, Any]:
        gold = int(doc["gold"])
        return {
            "query": restore_hellaswag_query(doc["query"]),
            "choices": [_drop_bracketed(c) for c in doc["choices"]],
            "gold": gold,
            "label": str(gold),
        }

    return dataset.map(_doc)


# --------------------------------------------------------------------------- run-time setup


def _write_wrappers(names: list[str], data_files: dict[str, dict[str, Path]], folder: Path) -> None:
    """One lm-eval task YAML per task: built-in YAML, then our overlay, then absolute data paths."""
    import lm_eval.tasks

    builtin_root = Path(lm_eval.tasks.__file__).resolve().parent
    for name in names:
        spec = _SPEC_BY_NAME[name]
        builtin = builtin_root / spec.builtin_yaml
        if not builtin.is_file():
            raise RuntimeError(
                f"lm-eval's own definition of '{spec.lm_eval_task}' is missing: {builtin}"
            )
        wrapper = {
            "include": [str(builtin), str(_overlay_path(name))],
            "task": spec.lm_eval_task,
            "dataset_kwargs": {
                "data_files": {split: str(p) for split, p in data_files[name].items()}
            },
        }
        text = yaml.safe_dump(wrapper, sort_keys=False, allow_unicode=True)
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No network, no worker processes, for the duration of the run.

    Sets the offline flags of huggingface_hub and datasets (environment and the already
    imported config modules) and lm-eval's DISABLE_MULTIPROC (bootstrap stderr in-process);
    all are restored afterwards.
    """
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    patched: list[tuple[Any, str, Any]] = []
    try:
        os.environ.update(env)
        import datasets.config
        import huggingface_hub.constants

        for mod, attr in (
            (huggingface_hub.constants, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_HUB_OFFLINE"),
            (datasets.config, "HF_DATASETS_OFFLINE"),
        ):
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropExpected(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep lm-eval's and datasets' progress bars and prints off the terminal (all but the
    loglikelihood request bar, which :func:`_with_request_bar` puts back).

    Logging is untouched except for the expected lm-eval messages above; what was printed is
    summarised on this module's logger at DEBUG level.
    """
    sink = io.StringIO()
    filters = [
        (logging.getLogger(name), _DropExpected(prefixes))
        for name, prefixes in _EXPECTED_LM_EVAL_MESSAGES.items()
    ]
    for lg, flt in filters:
        lg.addFilter(flt)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, flt in filters:
            lg.removeFilter(flt)
        if logger.isEnabledFor(logging.DEBUG):
            lines = [ln.strip() for ln in re.split(r"[\r\n]+", sink.getvalue()) if ln.strip()]
            if lines:
                logger.debug("lm-eval output (%d lines), last: %s", len(lines), lines[-1][:300])


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None
    return out


def _pick(metrics: Mapping[str, Any], name: str) -> Any:
    """A metric from lm-eval's ``"<metric>,<filter>"`` keys (filter "none" preferred)."""
    if f"{name},none" in metrics:
        return metrics[f"{name},none"]
    for key, value in metrics.items():
        if key.split(",", 1)[0] == name:
            return value
    return None


def _with_request_bar(hflm_cls: type, stream) -> type:
    """`hflm_cls` whose loglikelihood bar (lm-eval's own: counts, rate, ETA over all requests of all tasks)
    is drawn on `stream` (the terminal's stderr, while :func:`_quiet` holds the rest of lm-eval's output back),
    and is off under ``TQDM_DISABLE`` (lm-eval passes ``disable=False`` explicitly, which tqdm's environment
    default would not override) and when `stream` is not a terminal (``llmprune.progress.live_bars``: its
    carriage-return updates would fill a log file)."""

    class _HFLMWithBar(hflm_cls):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            with contextlib.redirect_stderr(stream):
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm or not live_bars(stream), override_bs=override_bs
                )

    return _HFLMWithBar


def _gold_index(task: Any, doc: Mapping[str, Any]) -> tuple[int | None, int]:
    """(gold choice index, number of choices) of a multiple-choice document, as lm-eval's
    ``ConfigurableTask.process_results`` finds them (gold None where it is not one valid index)."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else None
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        gold = None  # a list (several targets) or out of range: no single class
    return gold, len(choices)


def _label_stats(task: Any, limit: int | float | None) -> dict[str, Any]:
    """Majority-class baseline and chance rate over the documents lm-eval scores for `task` under `limit`
    (its own ``get_sample_size`` and ``doc_iterator``), and how many documents the task has."""
    from lm_eval.evaluator_utils import get_sample_size

    n_available = len(task.eval_docs)
    out: dict[str, Any] = {"majority_baseline": None, "chance": None, "n_available": n_available}
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
        return out  # e.g. LAMBADA: one continuation, no classes
    golds, sizes = [], []
    for _, doc in task.doc_iterator(rank=0, limit=get_sample_size(task, limit), world_size=1):
        gold, k = _gold_index(task, doc)
        sizes.append(k)
        golds.append(gold)
    if golds and None not in golds:
        out["majority_baseline"] = majority_share(golds)
    out["chance"] = chance_rate(sizes)
    return out


# --------------------------------------------------------------------------- public API


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks,
    data_dir,
    *,
    limit=None,
    batch_size=1,
    device=None,
    num_fewshot=0,
    add_bos_token=None,
) -> dict:
    """Zero-shot accuracy with lm-eval's Python API on an in-memory HF causal LM.

    No subprocess, no reload from disk, no network. `tasks` are llmprune's names (see
    :data:`KNOWN_TASKS`; lm-eval's ``lambada_openai`` is accepted for ``lambada``), as a list
    or one comma-separated string. `data_dir` holds ``<task>/<file>`` (None:
    ``$LLMPRUNE_DATA_DIR``).
    `limit` is lm-eval's (first N documents, or a fraction when < 1). `device`, when given, is
    where the model is moved for the run; it is moved back afterwards. `num_fewshot` > 0 draws
    shots from the scored split itself (no train splits are stored locally; lm-eval leaves out
    the document being scored). `add_bos_token` is HFLM's (None: the tokenizer's own rule; True/False:
    encode every request with/without the tokenizer's special tokens); it is recorded.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
    "metric", "metrics", "data_files", "sha256", "differs_from_hub", "lm_eval_task"}},
    "lm_eval_version", "limit", "num_fewshot", "data_dir", "max_length"}`` (`max_length`: the context lm-eval
    scored the requests at, from the model's config or tokenizer). Accuracies are fractions in [0, 1];
    values lm-eval does not compute for a task (e.g. acc_norm for boolq) are None. lambada also
    has "perplexity" and "perplexity_stderr". Each task also has "majority_baseline" (accuracy of
    always answering the most frequent gold label of the n scored documents), "chance" (mean of
    1 / number of choices), "n_available" (documents in the task) and "noisy" (see
    :mod:`llmprune.evaluation.baselines`); the first two are None for lambada, which has no
    classes. Warnings are logged when a result is noisy or no better than the majority baseline.
    lm-eval's bar over all loglikelihood requests (counts, ETA) is shown on stderr unless
    ``TQDM_DISABLE`` is set.

    Raises :class:`ZeroShotError` for an unknown task name or missing local data.
    """
    names = _resolve_task_names(tasks)
    root = _resolve_data_dir(data_dir)
    files = {name: task_data_files(name, root) for name in names}
    if model is None or tokenizer is None:
        # lm-eval would try to fetch a tokenizer by the model's name from the Hub.
        raise TypeError("evaluate_zero_shot needs an in-memory model and its tokenizer")
    if num_fewshot:
        logger.warning(
            "num_fewshot=%s: few-shot examples come from the scored split itself "
            "(no training split is stored locally)",
            num_fewshot,
        )

    import lm_eval
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    orig_device = None
    if device is not None:
        try:
            orig_device = next(model.parameters()).device
        except StopIteration:
            orig_device = None
    was_training = bool(getattr(model, "training", False))

    logger.info("zero-shot: %s (limit=%s, num_fewshot=%s)", ", ".join(names), limit, num_fewshot)
    terminal = sys.stderr  # where the request bar goes while _quiet() holds lm-eval's other output
    try:
        if device is not None:
            model.to(device)
        with tempfile.TemporaryDirectory(prefix="llmprune-lmeval-") as tmp, _offline(), _quiet():
            folder = Path(tmp)
            _write_wrappers(names, files, folder)
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            specs = [_SPEC_BY_NAME[n] for n in names]
            try:
                loaded = manager.load([s.lm_eval_task for s in specs])
            except KeyError:
                # The index skips YAMLs it cannot read; loading by path shows the actual error.
                loaded = manager.load([str(folder / f"{s.name}.yaml") for s in specs])
            for task_obj in loaded["tasks"].values():
                task_obj.set_config(key="num_fewshot", value=int(num_fewshot))
                task_obj.set_fewshot_seed(seed=1234)  # lm-eval's default few-shot seed
            lm = _with_request_bar(HFLM, terminal)(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token
            )
            max_length = int(lm.max_length)  # requests longer than this are cut from the left
            results = evaluate(
                lm=lm,
                task_dict=loaded,
                limit=limit,
                bootstrap_iters=_BOOTSTRAP_ITERS,
                log_samples=False,
            )
            # the gold labels of the same documents, through the same task objects
            label_stats = {s.name: _label_stats(loaded["tasks"][s.lm_eval_task], limit) for s in specs}
    finally:
        if orig_device is not None:
            model.to(orig_device)
        if hasattr(model, "train"):
            model.train(was_training)

    if results is None:  # not rank 0 (never the case for a single in-memory model)
        raise RuntimeError("lm-eval returned no results")

    out_tasks: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = _SPEC_BY_NAME[name]
        metrics = results["results"][spec.lm_eval_task]
        counts = results.get("n-samples", {}).get(spec.lm_eval_task, {})
        metric_names = sorted(
            {k.split(",", 1)[0] for k in metrics if "," in k and "_stderr" not in k}
        )
        entry: dict[str, Any] = {
            "acc": _num(_pick(metrics, "acc")),
            "acc_stderr": _num(_pick(metrics, "acc_stderr")),
            "acc_norm": _num(_pick(metrics, "acc_norm")),
            "acc_norm_stderr": _num(_pick(metrics, "acc_norm_stderr")),
            "n": int(counts.get("effective", counts.get("original", 0))),
            "metric": "acc",
            "metrics": metric_names,
            "data_files": [str(p) for p in files[name].values()],
            "sha256": {str(p): _sha256_16(p) for p in files[name].values()},
            "differs_from_hub": spec.differs_from_hub,
            "lm_eval_task": spec.lm_eval_task,
            **label_stats[name],
        }
        entry["noisy"] = is_noisy(entry)
        if "perplexity" in metric_names:
            entry["perplexity"] = _num(_pick(metrics, "perplexity"))
            entry["perplexity_stderr"] = _num(_pick(metrics, "perplexity_stderr"))
        out_tasks[name] = entry
        logger.info(
            "zero-shot %s: acc=%.4f acc_norm=%s n=%d",
            name,
            entry["acc"] if entry["acc"] is not None else float("nan"),
            "-" if entry["acc_norm"] is None else f"{entry['acc_norm']:.4f}",
            entry["n"],
        )

    for note in notes([(name, None, entry) for name, entry in out_tasks.items()]):
        logger.warning("zero-shot: %s", note)
    return {
        "tasks": out_tasks,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
        "num_fewshot": int(num_fewshot),
        "data_dir": str(root),
        "max_length": max_length,
        "add_bos_token": add_bos_token,
    }
