"""One entry point for every number users judge a model by: perplexity (papers' protocol) and zero-shot
accuracy (lm-eval), on an in-memory model, with the protocol recorded beside each number."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..bos import resolve_bos, tokenizer_for_plan
from ..errors import LLMPruneError, memory_step
from ..registry import unknown_name_message
from .perplexity import PPL_DATASETS, load_eval_tokens, perplexity

log = logging.getLogger(__name__)


def known_tasks() -> list[str]:
    from .zeroshot import KNOWN_TASKS

    return list(PPL_DATASETS) + list(KNOWN_TASKS)


def task_aliases() -> dict[str, str]:
    """Other spellings of our task names: lm-eval's (`wikitext`, `lambada_openai`) where they differ."""
    from .zeroshot import _ALIASES

    return {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2_raw": "wikitext2", **_ALIASES}


def split_tasks(tasks) -> tuple[list[str], list[str]]:
    """Validate task names (lm-eval's accepted too, any case; duplicates dropped); return (perplexity
    datasets, zero-shot tasks). No task at all is an error: there would be nothing to evaluate."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    known = known_tasks()
    if not names:
        raise LLMPruneError(f"no task given; known tasks: {', '.join(known)}")
    aliases = task_aliases()
    names = list(dict.fromkeys(aliases.get(n.lower(), n.lower() if n.lower() in known else n) for n in names))
    for n in names:
        if n not in known:
            raise LLMPruneError(unknown_name_message("task", n, known))
    return [n for n in names if n in PPL_DATASETS], [n for n in names if n not in PPL_DATASETS]


def check_eval_counts(limit=None, max_windows=None) -> None:
    """Refuse a zero or negative `limit` (zero-shot examples per task) or `max_windows` before any work: both
    would evaluate nothing."""
    if limit is not None and not limit > 0:
        raise LLMPruneError(f"--limit must be a positive number of examples per task, got {limit} (leave it out "
                            "for all examples)")
    if max_windows is not None and not max_windows >= 1:
        raise LLMPruneError(f"--eval-max-windows must be at least 1, got {max_windows} (leave it out for all windows)")


def _auto_ppl_batch(model: nn.Module, seqlen: int, device: torch.device) -> int:
    """Windows per forward: 1 on the CPU; on a GPU as many as fit the logits in a quarter of free memory."""
    if device.type != "cuda":
        return 1
    vocab = model.get_output_embeddings().weight.shape[0]
    free, _ = torch.cuda.mem_get_info(device)
    per_window = seqlen * vocab * 4 * 3  # float32 logits, their log-softmax, and slack
    return max(1, min(64, int(0.25 * free // per_window)))


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, tasks, *, seqlen: int = 2048, batch_size: int | str = "auto",
             limit: int | None = None, device: str | torch.device | None = None, data_dir=None,
             max_windows: int | None = None, compile: bool = False, bos: str = "auto",
             logits_budget_mb: float | None = None) -> dict:
    """Evaluate `model` on perplexity datasets (wikitext2, c4) and zero-shot tasks (lm-eval names).

    `limit` caps zero-shot examples per task; `max_windows` caps perplexity windows; `logits_budget_mb` bounds
    the perplexity logits alive at once (MiB). The model stays where it is unless `device` says otherwise (it is
    then moved there and back). `seqlen` is the perplexity window; lm-eval
    scores zero-shot requests at the model's own context length (`zero_shot.max_length`). `seqlen` in the result
    is the length actually used: the perplexity window, or with zero-shot tasks only that context length;
    `data_dir` is the folder read (absolute) or "hub". `bos` is the BOS policy (auto, always, never;
    `llmprune.bos`) of the perplexity windows and of the zero-shot requests (lm-eval's `add_bos_token`)."""
    from ..calibration.data import data_dir_label

    ppl_names, zs_names = split_tasks(tasks)
    check_eval_counts(limit, max_windows)
    plan = resolve_bos(bos, tokenizer, getattr(model, "config", None))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    results: dict = {"perplexity": {}, "zero_shot": {}, "seqlen": seqlen, "device": str(dev),
                     "data_dir": data_dir_label(data_dir)}
    if ppl_names:
        bs = _auto_ppl_batch(model, seqlen, dev) if batch_size == "auto" else int(batch_size)
        for name in ppl_names:
            ids, where = load_eval_tokens(name, tokenizer, data_dir, seqlen, bos=plan)
            lower = "a smaller --batch-size or --logits-budget-mb, or --dtype bfloat16"
            with memory_step(f"perplexity on {name}", lower):
                r = perplexity(model, ids, seqlen, batch_size=bs, device=dev, max_windows=max_windows, compile=compile,
                               desc=f"perplexity {name}", bos=plan, logits_budget_mb=logits_budget_mb)
            r.update(source=where, batch_size=bs, compiled=compile)
            results["perplexity"][name] = r
            log.info("%s: perplexity %.3f (%d windows of %d, %.0f tokens/s)", name, r["ppl"], r["windows"], seqlen,
                     r["tokens_per_s"] or 0)
    if zs_names:
        from .zeroshot import evaluate_zero_shot

        t = time.perf_counter()
        bs = 1 if batch_size == "auto" and dev.type == "cpu" else (batch_size if batch_size != "auto" else "auto")
        with memory_step(f"zero-shot evaluation ({', '.join(zs_names)})", "a smaller --batch-size or --dtype bfloat16"):
            zs = evaluate_zero_shot(model, tokenizer_for_plan(tokenizer, plan), zs_names, data_dir, limit=limit,
                                    batch_size=bs, device=dev, add_bos_token=plan.lm_eval_add_bos_token)
        zs["bos"] = plan.to_dict()
        zs["seconds"] = time.perf_counter() - t
        results["zero_shot"] = zs
        if not ppl_names:
            results["seqlen"] = zs["max_length"]
    return results


ZS_COLUMNS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa", "lambada"]
COLUMN_LABELS = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
                 "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA",
                 "lambada": "LAMBADA", "wikitext2": "WikiText-2 ppl", "c4": "C4 ppl"}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def zero_shot_details(rows: list[tuple[str, dict]]) -> str:
    """Each zero-shot accuracy (%) with lm-eval's standard error beside what it must beat, then the warnings
    (`baselines.notes`, at most two lines): rows = tasks (one per number of scored examples n), columns = n, the
    majority-class baseline and chance on those n examples, then one "acc ± stderr" column per model. "" when
    `rows` (= [(label, evaluate() result)]) have no zero-shot results."""
    from ..reporting import results_table
    from .baselines import notes

    lines: dict[tuple, dict] = {}  # (task, n, majority, chance) -> {column: cell}
    flagged = []
    for label, r in rows:
        tasks = (r.get("zero_shot") or {}).get("tasks", {})
        for c in ZS_COLUMNS:
            e = tasks.get(c)
            if e is None:
                continue
            metric = e.get("metric") or "acc"
            acc, se = e.get(metric), e.get(f"{metric}_stderr")
            key = (c, e.get("n"), e.get("majority_baseline"), e.get("chance"))
            lines.setdefault(key, {})[label] = _pct(acc) + ("" if se is None or acc is None else f" ± {100 * se:.1f}")
            flagged.append((COLUMN_LABELS[c], label if len(rows) > 1 else None, e))
    if not lines:
        return ""
    labels = [label for label, _ in rows]
    order = sorted(lines, key=lambda k: (ZS_COLUMNS.index(k[0]), k[1] or 0))
    table_rows = [(COLUMN_LABELS[c], {"n": "-" if n is None else str(n), "Majority": _pct(maj), "Chance": _pct(ch),
                                      **lines[(c, n, maj, ch)]}) for c, n, maj, ch in order]
    head = ("Zero-shot accuracy (%) ± standard error (lm-eval's), against always answering the majority class "
            "and a uniform guess (chance) on the same n examples:")
    table = results_table(table_rows, ["n", "Majority", "Chance", *labels], mean=False, label="Task")
    warn = [f"- {line[0].upper()}{line[1:]}" for line in notes(flagged)]
    return "\n".join([head, "", table.rstrip("\n"), *([""] + warn if warn else [])]) + "\n"


def results_markdown(rows: list[tuple[str, dict]]) -> str:
    """Wanda-paper layout: rows = models/methods, columns = zero-shot accuracies (%) and their mean, then
    perplexities; then the zero-shot details (`zero_shot_details`: standard errors, majority and chance, warnings).
    `rows` = [(label, evaluate() result)]."""
    from ..reporting import results_table

    zs_cols = [c for c in ZS_COLUMNS if any(c in (r.get("zero_shot") or {}).get("tasks", {}) for _, r in rows)]
    ppl_cols = [c for c in PPL_DATASETS if any(c in r.get("perplexity", {}) for _, r in rows)]
    parts = []
    if zs_cols:
        table_rows = [(label, {COLUMN_LABELS[c]: 100 * r["zero_shot"]["tasks"][c]["acc"]
                               for c in zs_cols if c in r["zero_shot"].get("tasks", {})}) for label, r in rows]
        parts.append(results_table(table_rows, [COLUMN_LABELS[c] for c in zs_cols], mean=True))
    if ppl_cols:
        table_rows = [(label, {COLUMN_LABELS[c]: r["perplexity"][c]["ppl"] for c in ppl_cols if c in r["perplexity"]})
                      for label, r in rows]
        parts.append(results_table(table_rows, [COLUMN_LABELS[c] for c in ppl_cols], mean=False))
    if zs_cols:
        parts.append(zero_shot_details(rows))
    return "\n\n".join(parts)


def _name(task: str) -> str:
    return COLUMN_LABELS.get(task, task).removesuffix(" ppl")


def _limit_text(limit) -> str:
    if isinstance(limit, float) and limit < 1:
        return f"`--limit {limit:g}`, the first {100 * limit:g} % of each task's examples"
    return f"`--limit {limit}`, the first {int(limit)} examples of each task"


def results_header(title: str, results, *, limit=None, max_windows: int | None = None,
                   zero_shot_where: str | None = None) -> str:
    """The lines above a results table: a title, the metric of each number, the perplexity window and the zero-shot
    `limit`, with a warning when `limit` leaves a task fewer than `baselines.MIN_EXAMPLES` examples (an accuracy's
    standard error is then up to 0.5 / sqrt(n - 1), e.g. 29 points at n = 4). `results` are evaluate() results;
    `zero_shot_where` says where zero-shot accuracies are when the tables below leave them out. Ends with a
    blank line."""
    from .baselines import MIN_EXAMPLES

    ppl: dict[str, dict] = {}
    zs: dict[str, dict] = {}
    for r in results:
        for name, p in (r.get("perplexity") or {}).items():
            ppl.setdefault(name, p)
        for name, e in ((r.get("zero_shot") or {}).get("tasks") or {}).items():
            zs.setdefault(name, e)
    lines = [f"# {title}", "", "- Metrics:" if ppl or zs else "- Metrics: none (nothing was evaluated)"]
    if ppl:
        lines.append(f"  - perplexity on {', '.join(_name(n) for n in ppl)}: exp of the mean next-token negative "
                     "log-likelihood, lower is better")
    if zs:
        kinds = "`, `".join(sorted({e.get("metric") or "acc" for e in zs.values()}))
        tasks = ", ".join(_name(n) for n in [c for c in ZS_COLUMNS if c in zs] + sorted(set(zs) - set(ZS_COLUMNS)))
        lines.append(f"  - zero-shot accuracy in % (lm-eval `{kinds}`), higher is better, on {tasks}"
                     + (f"; {zero_shot_where}" if zero_shot_where else ""))
    if ppl:
        seqlens = " / ".join(str(s) for s in sorted({p.get("seqlen") for p in ppl.values() if p.get("seqlen")}))
        windows = ", ".join(f"{_name(n)}: {p.get('windows')} windows" for n, p in ppl.items())
        cut = f", `--max-windows {max_windows}`" if max_windows is not None else ""
        lines.append(f"- Window: {seqlens} tokens per perplexity window, non-overlapping ({windows}{cut})")
    if limit is None:
        lines.append("- Zero-shot examples: all, no `--limit`" if zs else "- `--limit`: none (no zero-shot task)")
    elif not zs:
        lines.append(f"- `--limit {limit}`: no zero-shot task was evaluated, so it changed nothing")
    else:
        lines.append(f"- Zero-shot examples: {_limit_text(limit)}")
        cut_short = [e["n"] for e in zs.values() if e.get("n") is not None
                     and (e.get("n_available") is None or e["n"] < e["n_available"])]
        n = min(cut_short, default=None)  # None: every task was scored whole
        if n is not None and n < MIN_EXAMPLES:
            bound = f"up to {100 * 0.5 / (n - 1) ** 0.5:.0f} points" if n > 1 else "not estimable"
            lines += ["", f"> **Warning:** `--limit {limit}` is small: with {n} examples per task (fewer than "
                          f"{MIN_EXAMPLES}) an accuracy's standard error is {bound}, so these accuracies cannot tell "
                          "models apart and do not compare with full-task results. Use a larger `--limit`, or none."]
    return "\n".join(lines) + "\n\n"
