"""One entry point for every number users judge a model by: perplexity (papers' protocol) and zero-shot
accuracy (lm-eval), on an in-memory model, with the protocol recorded beside each number."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..bos import resolve_bos, tokenizer_for_plan
from ..errors import LLMPruneError
from ..registry import unknown_name_message
from .perplexity import PPL_DATASETS, load_eval_tokens, perplexity

log = logging.getLogger(__name__)


def known_tasks() -> list[str]:
    from .zeroshot import KNOWN_TASKS

    return list(PPL_DATASETS) + list(KNOWN_TASKS)


def split_tasks(tasks) -> tuple[list[str], list[str]]:
    """Validate task names; return (perplexity datasets, zero-shot tasks)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    known = known_tasks()
    aliases = {"lambada_openai": "lambada"}
    names = [aliases.get(n, n) for n in names]
    for n in names:
        if n not in known:
            raise LLMPruneError(unknown_name_message("task", n, known))
    return [n for n in names if n in PPL_DATASETS], [n for n in names if n not in PPL_DATASETS]


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
             max_windows: int | None = None, compile: bool = False, bos: str = "auto") -> dict:
    """Evaluate `model` on perplexity datasets (wikitext2, c4) and zero-shot tasks (lm-eval names).

    `limit` caps zero-shot examples per task; `max_windows` caps perplexity windows. The model stays where it is
    unless `device` says otherwise (it is then moved there and back). `bos` is the BOS policy (auto, always,
    never; `llmprune.bos`) of the perplexity windows and of the zero-shot requests (lm-eval's `add_bos_token`)."""
    ppl_names, zs_names = split_tasks(tasks)
    plan = resolve_bos(bos, tokenizer, getattr(model, "config", None))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    results: dict = {"perplexity": {}, "zero_shot": {}, "seqlen": seqlen, "device": str(dev)}
    if ppl_names:
        bs = _auto_ppl_batch(model, seqlen, dev) if batch_size == "auto" else int(batch_size)
        for name in ppl_names:
            ids, where = load_eval_tokens(name, tokenizer, data_dir, seqlen, bos=plan)
            r = perplexity(model, ids, seqlen, batch_size=bs, device=dev, max_windows=max_windows, compile=compile,
                           bos=plan)
            r.update(source=where, batch_size=bs, compiled=compile)
            results["perplexity"][name] = r
            log.info("%s: perplexity %.3f (%d windows of %d, %.0f tokens/s)", name, r["ppl"], r["windows"], seqlen,
                     r["tokens_per_s"] or 0)
    if zs_names:
        from .zeroshot import evaluate_zero_shot

        t = time.perf_counter()
        bs = 1 if batch_size == "auto" and dev.type == "cpu" else (batch_size if batch_size != "auto" else "auto")
        zs = evaluate_zero_shot(model, tokenizer_for_plan(tokenizer, plan), zs_names, data_dir, limit=limit,
                                batch_size=bs, device=dev, add_bos_token=plan.lm_eval_add_bos_token)
        zs["bos"] = plan.to_dict()
        zs["seconds"] = time.perf_counter() - t
        results["zero_shot"] = zs
    return results


ZS_COLUMNS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa", "lambada"]
COLUMN_LABELS = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
                 "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA",
                 "lambada": "LAMBADA", "wikitext2": "WikiText-2 ppl", "c4": "C4 ppl"}


def results_markdown(rows: list[tuple[str, dict]]) -> str:
    """Wanda-paper layout: rows = models/methods, columns = zero-shot accuracies (%) and their mean, then
    perplexities. `rows` = [(label, evaluate() result)]."""
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
    return "\n\n".join(parts)
