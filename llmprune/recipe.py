"""Recipes: the typed configs written down as YAML, one recipe per table cell, with the paper's number to compare.

A recipe file holds one cell:

    name: llama2-7b_wanda_50          # optional in a one-cell file (default: the file's stem)
    model: meta-llama/Llama-2-7b-hf   # Hub id, local folder, .gguf file, or null (the embedded SmolLM2)
    dtype: auto                       # optional: auto, float32, float16, bfloat16
    prune: {method: wanda, sparsity: 0.5, pattern: unstructured}   # PruneConfig keys, or null; a method's
                                      # options as `options: {alpha: 0.25}` or flat (`ria_alpha: 0.25`)
    blocks: {method: block-influence, num_blocks: 9}               # BlockPruneConfig keys (optional)
    calibration: {source: c4, nsamples: 128, seqlen: 4096, seed: 0}  # CalibrationConfig keys
    eval: {datasets: [wikitext2], seqlen: 4096}                      # EvalConfig keys, or null
    paper: {value: 6.42, metric: wikitext2_ppl, source: "...", tolerance: 0.03}  # optional
    skip: "why this cell is not run"  # optional: e.g. a variant llmprune does not implement
    notes: "free text"                # optional

A table file holds several cells sharing `defaults:` (merged section by section; a cell's `prune: null` drops
the default section):

    title: "..."    # optional
    notes: "..."    # optional
    defaults: {model: ..., calibration: {...}, eval: {...}}
    cells: [{name: ..., prune: {...}, paper: {...}}, ...]

Unknown keys anywhere are errors that name the key and the file. Paper metrics:

- `<dataset>_ppl` (e.g. `wikitext2_ppl`): perplexity of the final model on an `eval.datasets` entry;
- `removed_blocks`: the set of removed blocks (original indices), compared as a set, exactly;
- `block_order`: blocks by increasing first-round block score (least important first); `tolerance: k` means the
  first k must match in order (default: all of `value`);
- `block_score:<i>`: the first-round score of block i (for block-ppl: calibration perplexity without block i).

Tolerances of numeric metrics: a number (absolute, ±), `"N%"` (relative) or `"xN"` (within a factor N).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from numbers import Real
from pathlib import Path
from typing import Any

from .blocks.config import BlockPruneConfig
from .config import CalibrationConfig, EvalConfig, PruneConfig
from .errors import LLMPruneError

log = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml")
RECIPE_KEYS = ("name", "model", "dtype", "prune", "blocks", "calibration", "eval", "paper", "skip", "notes")
TABLE_KEYS = ("title", "notes", "defaults", "cells")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SET_METRICS = ("removed_blocks",)
ORDER_METRICS = ("block_order",)
_PPL_METRIC = re.compile(r"^([a-z0-9]+)_ppl$")
_SCORE_METRIC = re.compile(r"^block_score:(\d+)$")
_FACTOR = re.compile(r"^x\s*(\d+(?:\.\d+)?)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%$")


def _reject_unknown(data: Mapping, known, prefix: str, suffix: str = "") -> None:
    """One error naming every unknown key of `data` and the known ones."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise LLMPruneError(f"{prefix} {', '.join(unknown)}{suffix}; known: {', '.join(known)}")


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


# ---------------------------------------------------------------- the paper's number


@dataclass(frozen=True)
class PaperNumber:
    """A number a paper (or its reference repository) reports for one table cell, and how close counts."""

    value: Any  # a float, or a list of block indices for removed_blocks / block_order
    metric: str
    source: str
    tolerance: Any = None  # number | "N%" | "xN" | int (block_order) | None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise LLMPruneError("paper.source must say where the number comes from")
        if not isinstance(self.metric, str):
            raise LLMPruneError(f"paper.metric must be a string, got {self.metric!r}")
        kind = self.kind
        if kind in ("set", "order"):
            if not _is_int_list(self.value) or not self.value:
                raise LLMPruneError(f"paper.value of {self.metric} must be a non-empty list of block indices")
            object.__setattr__(self, "value", list(self.value))
            if kind == "set" and self.tolerance not in (None, 0, "exact"):
                raise LLMPruneError(f"paper.tolerance of {self.metric} must be empty or 'exact' (a set is compared exactly)")
            if kind == "order" and self.tolerance is not None and not (
                    isinstance(self.tolerance, int) and not isinstance(self.tolerance, bool)
                    and 1 <= self.tolerance <= len(self.value)):
                raise LLMPruneError(
                    f"paper.tolerance of block_order is how many leading blocks must match: 1..{len(self.value)}")
        else:
            if not _is_number(self.value) or not math.isfinite(float(self.value)):
                raise LLMPruneError(f"paper.value of {self.metric} must be a finite number, got {self.value!r}")
            self.tolerance_spec()  # validates

    @property
    def kind(self) -> str:
        """"number", "set" or "order"."""
        if self.metric in SET_METRICS:
            return "set"
        if self.metric in ORDER_METRICS:
            return "order"
        if _PPL_METRIC.match(self.metric) or _SCORE_METRIC.match(self.metric):
            return "number"
        raise LLMPruneError(
            f"unknown paper metric {self.metric!r}; known: <dataset>_ppl (e.g. wikitext2_ppl), removed_blocks, "
            "block_order, block_score:<i>")

    def tolerance_spec(self) -> tuple[str, float] | None:
        """("abs", t) | ("rel", fraction) | ("factor", f) | None for a numeric metric."""
        t = self.tolerance
        if t is None:
            return None
        if _is_number(t):
            if not (float(t) >= 0):
                raise LLMPruneError(f"paper.tolerance must be >= 0, got {t}")
            return ("abs", float(t))
        if isinstance(t, str):
            m = _PERCENT.match(t.strip())
            if m:
                return ("rel", float(m.group(1)) / 100)
            m = _FACTOR.match(t.strip())
            if m and float(m.group(1)) >= 1:
                return ("factor", float(m.group(1)))
        raise LLMPruneError(f"paper.tolerance {t!r}: give a number (±), 'N%' (relative) or 'xN' (within a factor N)")

    def tolerance_text(self) -> str:
        kind = self.kind
        if kind == "set":
            return "exact set"
        if kind == "order":
            k = self.tolerance or len(self.value)
            return f"first {k} in order"
        spec = self.tolerance_spec()
        if spec is None:
            return "-"
        how, t = spec
        return {"abs": f"±{t:g}", "rel": f"±{100 * t:g}%", "factor": f"×{t:g}"}[how]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "metric": self.metric, "source": self.source, "tolerance": self.tolerance}


# ---------------------------------------------------------------- a recipe


@dataclass(frozen=True)
class Recipe:
    """One table cell: the model, the typed configs that produce it, and the paper's number to compare with."""

    name: str
    model: str | None = None
    prune: PruneConfig | None = None
    blocks: BlockPruneConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    paper: PaperNumber | None = None
    skip: str | None = None
    dtype: str = "auto"
    notes: str | None = None
    path: str | None = field(default=None, compare=False)  # the file it was read from (not part of the recipe)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise LLMPruneError("a recipe needs a name")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise LLMPruneError(f"model must be a Hub id, a path or null, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise LLMPruneError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.skip is not None and (not isinstance(self.skip, str) or not self.skip.strip()):
            raise LLMPruneError("skip must be a reason (text)")
        if self.eval is not None:
            from .evaluation.perplexity import PPL_DATASETS

            for ds in self.eval.datasets:
                if ds not in PPL_DATASETS:
                    raise LLMPruneError(f"unknown eval dataset {ds!r}; known: {', '.join(PPL_DATASETS)}")
        if self.paper is not None:
            m = _PPL_METRIC.match(self.paper.metric)
            if m and (self.eval is None or m.group(1) not in self.eval.datasets):
                raise LLMPruneError(
                    f"paper metric {self.paper.metric} needs {m.group(1)!r} in eval.datasets")
            if self.paper.kind != "number" or _SCORE_METRIC.match(self.paper.metric):
                if self.blocks is None:
                    raise LLMPruneError(f"paper metric {self.paper.metric} needs a blocks: section")

    @property
    def is_dense(self) -> bool:
        """Nothing to prune: the cell evaluates the model as it is."""
        return self.prune is None and self.blocks is None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `Recipe.from_dict` (and YAML) read back to an equal recipe."""
        return {
            "name": self.name, "model": self.model, "dtype": self.dtype,
            "prune": self.prune.to_dict() if self.prune else None,
            "blocks": _plain(self.blocks.to_dict()) if self.blocks else None,
            "calibration": self.calibration.to_dict(),
            "eval": _plain(self.eval.to_dict()) if self.eval else None,
            "paper": self.paper.to_dict() if self.paper else None,
            "skip": self.skip, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe", path: str | None = None) -> "Recipe":
        """Build a recipe from a dict of plain values; errors say `where` (file and cell) and the key."""
        if not isinstance(data, Mapping):
            raise LLMPruneError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
        _reject_unknown(data, RECIPE_KEYS, f"{where}: unknown key(s)")
        name = data.get("name")
        if name is None and path is not None:
            name = Path(path).stem
        where = f"{where} (cell {name!r})" if "cell" not in where and name else where
        kw: dict[str, Any] = {"name": name, "path": path}
        for key in ("model", "skip", "notes"):
            if key in data:
                kw[key] = data[key]
        if data.get("dtype") is not None:
            kw["dtype"] = data["dtype"]
        sections = {"prune": PruneConfig, "blocks": BlockPruneConfig, "calibration": CalibrationConfig,
                    "eval": EvalConfig, "paper": PaperNumber}
        for key, cls_ in sections.items():
            if key not in data:
                continue
            value = data[key]
            if value is None:
                if key == "calibration":
                    raise LLMPruneError(f"{where}: calibration cannot be null (leave it out for the defaults)")
                kw[key] = None
                continue
            kw[key] = _section(cls_, value, f"{where}: {key}")
        try:
            return cls(**kw)
        except LLMPruneError as e:
            raise LLMPruneError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise LLMPruneError(f"{where}: {e}") from None


def _plain(d: dict) -> dict:
    """Tuples as lists, so YAML writes plain sequences."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _section(cls_, value, where: str):
    if not isinstance(value, Mapping):
        raise LLMPruneError(f"{where}: expected a mapping of {cls_.__name__} keys, got {type(value).__name__}")
    known = set(cls_.known_keys()) if hasattr(cls_, "known_keys") else {f.name for f in fields(cls_)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise LLMPruneError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls_(**value)
    except LLMPruneError as e:
        raise LLMPruneError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a wrong type in YAML, e.g. sparsity: "half"
        raise LLMPruneError(f"{where}: {e}") from None


# ---------------------------------------------------------------- files and tables


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LLMPruneError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LLMPruneError(_yaml_error_message(path, e)) from None


def _yaml_error_message(path: Path, e) -> str:
    """`recipe.yaml, line 3, column 12: not valid YAML: expected ',' or '}', but got '<scalar>' (while parsing a
    flow mapping that starts at line 2, column 9)`: where the parser stopped, what it expected, what it was in."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or " ".join(str(e).split()) or type(e).__name__
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        context = f"{context} that starts at line {cmark.line + 1}, column {cmark.column + 1}"
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def _merge(defaults: Mapping, cell: Mapping) -> dict:
    """A cell over the defaults, section by section (a cell's None replaces a whole default section)."""
    out = dict(defaults)
    for key, value in cell.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _table_cells(path: Path, data: Mapping) -> list[Recipe]:
    _reject_unknown(data, TABLE_KEYS, f"{path}: unknown key(s)", " in a table")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise LLMPruneError(f"{path}: defaults must be a mapping of recipe keys")
    _reject_unknown(defaults, RECIPE_KEYS, f"{path}: defaults: unknown key(s)")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise LLMPruneError(f"{path}: cells must be a non-empty list of recipes")
    out = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, Mapping):
            raise LLMPruneError(f"{path}: cell {i + 1} must be a mapping")
        if not cell.get("name"):
            raise LLMPruneError(f"{path}: cell {i + 1} needs a name")
        out.append(Recipe.from_dict(_merge(defaults, cell), where=f"{path} (cell {cell['name']!r})", path=str(path)))
    return out


def _load_file(path: Path) -> list[Recipe]:
    data = _read_yaml(path)
    if isinstance(data, Mapping) and "cells" in data:
        return _table_cells(path, data)
    _refuse_defaults_without_cells(path, data)
    if data is None:
        raise LLMPruneError(f"{path}: empty recipe")
    return [Recipe.from_dict(data, where=str(path), path=str(path))]


def _refuse_defaults_without_cells(path: Path, data) -> None:
    if isinstance(data, Mapping) and "defaults" in data:
        raise LLMPruneError(f"{path} has `defaults:` but no `cells:`: a table lists its recipes under `cells:` "
                            "(each with a `name:`, merged over the defaults); a single recipe has no `defaults:`")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read one recipe (one table cell) from a YAML file; a file with `cells:` is a table (see `load_table`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LLMPruneError(f"recipe not found: {p}")
    data = _read_yaml(p)
    if isinstance(data, Mapping) and "cells" in data:
        raise LLMPruneError(f"{p} is a table of cells; load it with load_table (or `reproduce`)")
    _refuse_defaults_without_cells(p, data)
    return _load_file(p)[0]


def recipe_files(path: str | os.PathLike) -> list[Path]:
    """The YAML files of a table: the file itself, or a folder's *.yaml/*.yml in name order (not recursive)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in RECIPE_SUFFIXES)
        if not files:
            raise LLMPruneError(f"no recipe files (*.yaml) in {p}")
        return files
    raise LLMPruneError(f"recipe table not found: {p}")


def load_table(path: str | os.PathLike) -> list[Recipe]:
    """All cells of a table, in order: a folder of recipe files (name order; a file may itself hold `cells:`),
    or one YAML file with `cells:` sharing `defaults:`. Cell names must be unique."""
    recipes: list[Recipe] = []
    for f in recipe_files(path):
        recipes.extend(_load_file(f))
    seen: dict[str, str | None] = {}
    for r in recipes:
        if r.name in seen:
            raise LLMPruneError(f"cell name {r.name!r} appears twice ({seen[r.name]} and {r.path}); names must be unique")
        seen[r.name] = r.path
    return recipes


def table_title(path: str | os.PathLike) -> str:
    """A table's `title:` when one file gives it, else the folder's or file's name."""
    p = Path(path).expanduser()
    for f in recipe_files(p):
        data = _read_yaml(f)
        if isinstance(data, Mapping) and isinstance(data.get("title"), str):
            return data["title"]
    return p.stem if p.is_file() else p.name


def with_data_dir(recipe: Recipe, data_dir: str | os.PathLike | None) -> Recipe:
    """The recipe with `data_dir` filled in where it gives none, and a relative calibration file looked up under
    `data_dir` when it is not found from the working directory."""
    if data_dir is None:
        return recipe
    d = str(Path(data_dir).expanduser())
    calib = recipe.calibration
    if calib.data_dir is None:
        calib = replace(calib, data_dir=d)
    src = Path(calib.source).expanduser()
    if src.suffix and not src.is_absolute() and not src.exists() and (Path(d) / src).exists():
        calib = replace(calib, source=str(Path(d) / src))
    ev = recipe.eval
    if ev is not None and ev.data_dir is None:
        ev = replace(ev, data_dir=d)
    return replace(recipe, calibration=calib, eval=ev)


# ---------------------------------------------------------------- comparison with the paper


def cell_metric(recipe: Recipe) -> str | None:
    """The metric a cell is judged by: the paper's, else perplexity on the first eval dataset, else the removed
    blocks (cells without a paper number still show our result)."""
    if recipe.paper is not None:
        return recipe.paper.metric
    if recipe.eval is not None and recipe.eval.datasets:
        return f"{recipe.eval.datasets[0]}_ppl"
    if recipe.blocks is not None:
        return "removed_blocks"
    return None


def measured_value(recipe: Recipe, record, metric: str | None = None) -> Any:
    """Our value of `metric` (default: `cell_metric(recipe)`) read from a run record: run_prune_job's `JobRecord`
    (or its llmprune.json dict), or run_eval_job's dict (its `results`)."""
    from .record import JobRecord

    metric = metric or cell_metric(recipe)
    if metric is None:
        return None
    if isinstance(record, Mapping) and "results" in record and "config" not in record:  # run_eval_job's record
        m = _PPL_METRIC.match(metric)
        r = ((record.get("results") or {}).get("perplexity") or {}).get(m.group(1)) if m else None
        return _ppl_value(r)
    record = JobRecord.of(record)
    m = _PPL_METRIC.match(metric)
    if m:
        return _ppl_of(record, m.group(1))
    blocks = record.blocks
    if metric == "removed_blocks":
        return sorted(blocks.removed) if blocks is not None and blocks.removed is not None else None
    scores = blocks.scores if blocks is not None else None
    if scores is None:
        return None
    if metric == "block_order":
        return sorted(range(len(scores)), key=lambda i: (scores[i], i))
    i = int(_SCORE_METRIC.match(metric).group(1))
    return scores[i] if i < len(scores) else None


def _ppl_value(r) -> float | None:
    return r["ppl"] if isinstance(r, Mapping) else r


def _ppl_of(record, dataset: str) -> float | None:
    """Perplexity on `dataset` of a JobRecord: after pruning, else of the dense model."""
    for stage in (record.perplexity.pruned, record.perplexity.dense):
        r = (stage or {}).get(dataset)
        if r is not None:
            return _ppl_value(r)
    return None


def compare(paper: PaperNumber, ours: Any) -> dict[str, Any]:
    """{"difference": ..., "within": True/False/None} of our value against the paper's."""
    if ours is None:
        return {"difference": None, "within": None}
    kind = paper.kind
    if kind == "set":
        want, got = set(paper.value), set(ours)
        return {"difference": {"extra": sorted(got - want), "missing": sorted(want - got)}, "within": want == got}
    if kind == "order":
        k = paper.tolerance or len(paper.value)
        first_diff = next((i for i in range(k) if i >= len(ours) or ours[i] != paper.value[i]), None)
        return {"difference": {"first_mismatch": first_diff}, "within": first_diff is None}
    if not _is_number(ours) or not math.isfinite(float(ours)):
        return {"difference": None, "within": False}
    diff = float(ours) - float(paper.value)
    spec = paper.tolerance_spec()
    if spec is None:
        within = None
    else:
        how, t = spec
        if how == "abs":
            within = abs(diff) <= t + 1e-12
        elif how == "rel":
            within = abs(diff) <= t * abs(float(paper.value)) + 1e-12
        else:
            a, b = float(ours), float(paper.value)
            within = a > 0 and b > 0 and max(a / b, b / a) <= t
    return {"difference": diff, "within": within}


def _decimals(v) -> int:
    text = repr(float(v))
    return len(text.split(".")[1]) if "." in text and "e" not in text else 2


def _fmt(v, decimals: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(str(i) for i in v)
    if _is_number(v):
        return f"{float(v):.{decimals}f}"
    return str(v)


def _fmt_diff(diff, decimals: int) -> str:
    if diff is None:
        return "-"
    if isinstance(diff, Mapping) and "extra" in diff:
        parts = ([f"+{{{', '.join(map(str, diff['extra']))}}}"] if diff["extra"] else []) + (
            [f"-{{{', '.join(map(str, diff['missing']))}}}"] if diff["missing"] else [])
        return " ".join(parts) or "none"
    if isinstance(diff, Mapping) and "first_mismatch" in diff:
        i = diff["first_mismatch"]
        return "none" if i is None else f"differs at position {i + 1}"
    return f"{float(diff):+.{decimals}f}"


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_comparison(rows: Sequence[Mapping]) -> str:
    """A GitHub Markdown table of cells beside the papers' numbers: cell, metric, paper, ours, difference,
    tolerance, within tolerance?; skipped or failed cells show why in a list below the table.

    `rows`: dicts with `name`, `paper` (PaperNumber or its dict, or None), `ours`, and optionally `metric` (shown
    when there is no paper number), `status` ("ok", "skipped", "failed") and `reason`; `difference`/`within` are
    computed when absent."""
    header = ["Cell", "Metric", "Paper", "Ours", "Difference", "Tolerance", "Within tolerance?"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join([":---", ":---"] + ["---:"] * 4 + [":---:"]) + " |"]
    notes = []
    for row in rows:
        if not isinstance(row, Mapping) or "name" not in row:
            raise LLMPruneError(f"each comparison row must be a mapping with a name, got {row!r}")
        paper = row.get("paper")
        if isinstance(paper, Mapping):
            paper = PaperNumber(**paper)
        status = row.get("status", "ok")
        ours = row.get("ours")
        if paper is not None and ("within" not in row or "difference" not in row):
            cmp = compare(paper, ours) if status == "ok" else {"difference": None, "within": None}
        else:
            cmp = {"difference": row.get("difference"), "within": row.get("within")}
        decimals = max(2, _decimals(paper.value)) if paper is not None and paper.kind == "number" else 2
        if status != "ok":
            verdict = status
            notes.append(f"- `{row['name']}`: {status}: {row.get('reason') or 'no reason given'}")
        elif paper is None:
            verdict = "-"
        else:
            verdict = {True: "yes", False: "**no**", None: "-"}[cmp["within"]]
        lines.append("| " + " | ".join(_escape(c) for c in [
            row["name"],
            paper.metric if paper else (row.get("metric") or "-"),
            _fmt(paper.value, decimals) if paper else "-",
            _fmt(ours, decimals) if status == "ok" else "-",
            _fmt_diff(cmp["difference"], decimals),
            paper.tolerance_text() if paper else "-",
            verdict,
        ]) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def _cell_key(row: Mapping) -> tuple[str, str] | None:
    """(method, setting) of a weight-pruning cell that ran: setting = the N:M pattern or the sparsity."""
    prune = (row.get("recipe") or {}).get("prune")
    if row.get("status", "ok") != "ok" or not prune or row.get("ours") is None or (row.get("recipe") or {}).get("blocks"):
        return None
    pattern = prune.get("pattern") or "unstructured"
    setting = pattern if pattern != "unstructured" else f"{100 * float(prune.get('sparsity') or 0):g} %"
    return prune["method"], setting


def ordering_checks(rows: Sequence[Mapping]) -> dict:
    """The papers' qualitative claims, checked on a table's cells (lower metric = better, e.g. perplexity):
    SparseGPT and Wanda (and RIA) beat magnitude at every setting (Wanda Table 3, SparseGPT Fig. 1), and for
    each method unstructured beats 4:8, which beats 2:4 at 50 % (Wanda Table 3). Cells are compared only with
    cells of the same model and metric; of two cells with the same model, metric, method and setting the
    first is used and the other listed under `duplicates`. Returns per (model, metric) group the method x setting
    grid and its claims ({claim, holds, values}), and all claims."""
    groups: dict[tuple[str, str], dict] = {}
    duplicates = []
    for row in rows:
        key = _cell_key(row)
        if not key:
            continue
        model = str(row.get("model") or (row.get("recipe") or {}).get("model") or "default model")
        metric = str(row.get("metric") or "metric")
        grid = groups.setdefault((model, metric), {"model": model, "metric": metric, "grid": {}})["grid"]
        if key[1] in grid.get(key[0], {}):
            duplicates.append(row.get("name"))
            continue
        grid.setdefault(key[0], {})[key[1]] = float(row["ours"])

    def order(s: str):  # unstructured by sparsity, then N:M with the larger M (the looser pattern) first
        return (1, -int(s.split(":")[1])) if ":" in s else (0, float(s.split()[0]))

    out, every = [], []
    for g in groups.values():
        grid = g["grid"]
        settings = sorted({s for m in grid.values() for s in m}, key=order)
        claims = []
        for better in ("sparsegpt", "wanda", "ria"):
            for s in settings:
                if better in grid and "magnitude" in grid and s in grid[better] and s in grid["magnitude"]:
                    a, b = grid[better][s], grid["magnitude"][s]
                    claims.append({"claim": f"{better} < magnitude at {s}", "holds": a < b, "values": [a, b]})
        chain = [s for s in ("50 %", "4:8", "2:4") if s in settings]
        for method, vals in grid.items():
            have = [s for s in chain if s in vals]
            for lo, hi in zip(have, have[1:]):
                claims.append({"claim": f"{method}: {lo} < {hi}", "holds": vals[lo] < vals[hi],
                               "values": [vals[lo], vals[hi]]})
        g.update(settings=settings, claims=claims)
        out.append(g)
        every += [{**c, "model": g["model"], "metric": g["metric"]} for c in claims]
    return {"groups": out, "claims": every, "duplicates": duplicates}


def render_orderings(checks: Mapping) -> str:
    """Markdown: per model and metric, the method x setting grid, then each claim with yes/**no**."""
    parts = []
    many = len(checks["groups"]) > 1
    for g in checks["groups"]:
        grid, settings, claims = g["grid"], g["settings"], g["claims"]
        if not claims:
            continue
        lines = [f"**{g['model']}**, {g['metric']}:", ""] if many else []
        lines += ["| Method | " + " | ".join(settings) + " |", "| :--- | " + " | ".join(["---:"] * len(settings)) + " |"]
        for method, vals in grid.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(vals.get(s), 2) if s in vals else "-" for s in settings)
                         + " |")
        held = sum(c["holds"] for c in claims)
        lines += ["", f"The papers' orderings: {held} of {len(claims)} hold.", "",
                  "| Claim (lower is better) | Values | Holds? |", "| :--- | ---: | :---: |"]
        for c in claims:
            lines.append(f"| {c['claim']} | {' vs '.join(_fmt(v, 2) for v in c['values'])} | "
                         f"{'yes' if c['holds'] else '**no**'} |")
        parts.append("\n".join(lines) + "\n")
    if checks.get("duplicates"):
        parts.append("Not compared (same model, metric, method and setting as an earlier cell): "
                     + ", ".join(f"`{n}`" for n in checks["duplicates"]) + "\n")
    return "\n".join(parts)


__all__ = ["Recipe", "PaperNumber", "load_recipe", "load_table", "recipe_files", "table_title", "with_data_dir",
           "cell_metric", "measured_value", "compare", "render_comparison", "ordering_checks", "render_orderings"]
