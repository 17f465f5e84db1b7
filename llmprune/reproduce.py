"""Reproduce a paper table: run each recipe cell whose model can be loaded here, and set our numbers beside the
paper's, with the difference and whether it lies within the tolerance (results.json + comparison.md)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import LLMPruneError
from .record import JobRecord
from .recipe import (Recipe, cell_metric, compare, load_table, measured_value, ordering_checks, render_comparison,
                     render_orderings, table_title, with_data_dir)

log = logging.getLogger(__name__)

Runner = Callable[[Recipe], JobRecord | Mapping]


def model_availability(model: str | None) -> tuple[bool, str]:
    """(can it be loaded here?, why not). The embedded default needs its package; a local path must exist; a Hub
    id counts when its config.json is in the local Hugging Face cache, or when the Hub answers (not offline)."""
    if model is None:
        from .models.load import default_model_path

        try:
            default_model_path()
        except LLMPruneError as e:
            return False, str(e)
        return True, ""
    p = Path(model).expanduser()
    if p.exists():
        return True, ""
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1:
        return False, f"local model {model} not found"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        return False, f"{model!r} is neither a local path nor a valid Hub id"
    if isinstance(cached, str):
        return True, ""
    if _offline():
        return False, f"Hub model {model} is not in the local Hugging Face cache and the Hub is offline"
    return _hub_reachable(model)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(model: str) -> tuple[bool, str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except GatedRepoError:
        return False, f"Hub model {model} is gated: accept its license on the Hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return False, f"Hub model {model} not found (or private)"
    except HfHubHTTPError as e:
        return False, f"Hub model {model}: the Hub answered {getattr(e.response, 'status_code', '?')}"
    except Exception as e:  # noqa: BLE001 - any transport failure means: not loadable here
        return False, f"Hub model {model}: the Hugging Face Hub was unreachable ({type(e).__name__})"
    return True, ""


def _calibration_availability(recipe: Recipe) -> tuple[bool, str]:
    """A calibration file named by a recipe must exist (named datasets are checked when they load)."""
    needs = recipe.blocks is not None or (recipe.prune is not None and recipe.prune.needs_calibration)
    src = Path(recipe.calibration.source).expanduser()
    if needs and src.suffix and not src.exists():
        return False, f"calibration file {recipe.calibration.source} not found (relative paths: from here, then data_dir)"
    return True, ""


def run_recipe(recipe: Recipe) -> JobRecord | dict:
    """The default runner: run_prune_job with the recipe's configs (run_eval_job for a dense cell). Nothing is
    saved; the dense model is not evaluated again in pruning cells (the table has its own dense cells)."""
    from .pipeline import run_eval_job, run_prune_job

    if recipe.is_dense:
        ev = recipe.eval
        if ev is None or not ev.datasets:
            raise LLMPruneError(f"cell {recipe.name}: nothing to prune and nothing to evaluate")
        return run_eval_job(recipe.model, ev.datasets, seqlen=ev.seqlen, batch_size=ev.batch_size, dtype=recipe.dtype,
                            data_dir=ev.data_dir, max_windows=ev.max_windows, bos=ev.bos,
                            logits_budget_mb=ev.logits_budget_mb)
    return run_prune_job(recipe.model, recipe.prune, recipe.calibration, recipe.eval, dtype=recipe.dtype,
                         eval_dense=False, block_cfg=recipe.blocks)


def reproduce(table_path: str | os.PathLike, *, out_dir: str | os.PathLike, runner: Runner | None = None,
              data_dir: str | os.PathLike | None = None, only_available: bool = True, overwrite: bool = False) -> dict:
    """Run every cell of a recipe table (a folder of recipes or a `cells:` file) and compare with the paper.

    Cells marked `skip:` are reported as skipped. A cell whose model cannot be loaded here (e.g. a Hub id while
    offline) is skipped with the reason when `only_available`, else an LLMPruneError is raised before anything
    runs. `runner(recipe) -> record` runs one cell (default: `run_recipe`); a cell whose runner raises an
    LLMPruneError is reported as failed and the others go on. `data_dir` fills the recipes' data_dir where they
    give none. Writes `results.json` and `comparison.md` into `out_dir` (existing ones are replaced only with
    `overwrite`); returns the results with their paths."""
    from .reporting import write_json
    from .versions import package_versions

    from .outputs import check_results_free, check_writable, output_errors, write_text_atomic

    check_writable(out_dir, "output folder")  # before any cell runs
    check_results_free(out_dir, ("results.json", "comparison.md"), overwrite)
    recipes = load_table(table_path)
    title = table_title(table_path)
    runner = runner or run_recipe
    from .calibration.data import resolve_data_dir

    data_dir = resolve_data_dir(data_dir)  # given, else $LLMPRUNE_DATA_DIR, else None
    plan: list[tuple[Recipe, str, str]] = []  # (recipe, status, reason); status "run" | "skipped"
    unavailable = []
    for r in recipes:
        r = with_data_dir(r, data_dir)
        if r.skip:
            plan.append((r, "skipped", f"not run: {r.skip}"))
            continue
        ok, why = model_availability(r.model)
        if ok:
            ok, why = _calibration_availability(r)
        if not ok:
            unavailable.append(f"{r.name}: {why}")
            plan.append((r, "skipped", why))
        else:
            plan.append((r, "run", ""))
    if unavailable and not only_available:
        more = f" (and {len(unavailable) - 1} more)" if len(unavailable) > 1 else ""
        raise LLMPruneError(f"cannot run cell {unavailable[0]}{more}; nothing was run (only_available=True skips them)")

    cells = []
    for i, (r, status, reason) in enumerate(plan):
        cell: dict[str, Any] = {"name": r.name, "model": r.model, "recipe": r.to_dict(), "file": r.path,
                                "paper": r.paper.to_dict() if r.paper else None, "metric": cell_metric(r),
                                "status": status,
                                "reason": reason or None, "ours": None, "difference": None, "within": None}
        if status == "run":
            log.info("cell %d/%d: %s", i + 1, len(plan), r.name)
            t = time.perf_counter()
            try:
                record = runner(r)  # a JobRecord (pruning), or run_eval_job's dict (a dense cell)
            except LLMPruneError as e:
                log.warning("cell %s failed: %s", r.name, e)
                cell.update(status="failed", reason=str(e))
            else:
                cell["status"] = "ok"
                cell["seconds"] = time.perf_counter() - t
                cell["record"] = record.to_dict() if isinstance(record, JobRecord) else dict(record)
                cell["ours"] = measured_value(r, record)
                if r.paper is not None:
                    cell.update(compare(r.paper, cell["ours"]))
        cells.append(cell)

    orderings = ordering_checks(cells)
    table = f"# {title}\n\n" + render_comparison(cells)
    if orderings["claims"]:
        table += "\n## Orderings\n\n" + render_orderings(orderings)
    out = Path(out_dir).expanduser()
    counts = {s: sum(c["status"] == s for c in cells) for s in ("ok", "skipped", "failed")}
    data = {"table": str(table_path), "title": title, "counts": counts, "cells": cells, "orderings": orderings,
            "versions": package_versions()}
    from .export.provenance import DATA_DIR_LABEL, PathScrubber, model_roots

    scrubber = PathScrubber({out: out.absolute().name})  # no absolute local path in what is written
    for r, _, _ in plan:
        for d in {r.calibration.data_dir, r.eval.data_dir if r.eval else None, data_dir} - {None}:
            scrubber.add(d, DATA_DIR_LABEL)
        for root, label in model_roots(r.model).items():
            scrubber.add(root, label)
    data, table = scrubber.scrub(data), scrubber.scrub_text(table)
    comparison_path = out / "comparison.md"
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        results_path = write_json(out / "results.json", data)
        write_text_atomic(comparison_path, table)
    log.info("%s: %d run, %d skipped, %d failed; %s", title, counts["ok"], counts["skipped"], counts["failed"],
             comparison_path)
    data.update(results=str(results_path), comparison=str(comparison_path), markdown=table)
    return data


__all__ = ["reproduce", "run_recipe", "model_availability"]
