"""GitHub Markdown tables of results, in the layout of the Wanda paper's tables (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models", Tables 2-4): one row per method, one column per task or
setting, an optional Mean column. Tables are generated from result records, never typed by hand."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real

from ..errors import LLMPruneError

log = logging.getLogger(__name__)

MISSING = "-"
# How methods are written in the papers; other names are shown as given.
METHOD_NAMES = {"dense": "Dense", "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "ria": "RIA"}


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_missing(v) -> bool:
    return v is None or (_is_number(v) and math.isnan(float(v)))


def _escape(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(v, fmt: str) -> str:
    if _is_missing(v):
        return MISSING
    if _is_number(v):
        return fmt.format(v)
    return _escape(v)


def _markdown(header: Sequence[str], body: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    align = [":---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, align, *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def results_table(rows: Sequence[tuple[str, Mapping]], columns: Sequence[str], *, mean: bool = True,
                  fmt: str = "{:.2f}", label: str = "Method") -> str:
    """A GitHub Markdown table: rows = methods (`rows` is a list of (label, {column: value})), columns = tasks or
    settings in the order of `columns`, then a Mean column when `mean`.

    Missing cells (absent, None or NaN) show as "-"; numbers go through `fmt`, other values are shown as text.
    A row's mean is over all `columns` and is "-" when one of its cells is missing or not a number, so that
    the means of a table always compare like with like. Ends with a newline."""
    columns = list(columns)
    try:
        fmt.format(0.0)
    except (ValueError, IndexError, KeyError) as e:
        raise LLMPruneError(f"fmt {fmt!r} cannot format a number: {e}") from None
    header = [_escape(label), *(_escape(c) for c in columns)] + (["Mean"] if mean else [])
    body = []
    for row in rows:
        try:
            name, values = row
        except (TypeError, ValueError):
            raise LLMPruneError(f"each row must be (label, {{column: value}}), got {row!r}") from None
        if not isinstance(values, Mapping):
            raise LLMPruneError(f"row {name!r}: values must be a mapping column -> value, got {type(values).__name__}")
        unknown = [k for k in values if k not in columns]
        if unknown:
            log.debug("row %r: columns not shown: %s", name, unknown)
        cells = [values.get(c) for c in columns]
        line = [_escape(name), *(_cell(v, fmt) for v in cells)]
        if mean:
            ok = columns and all(_is_number(v) and not _is_missing(v) for v in cells)
            line.append(fmt.format(sum(float(v) for v in cells) / len(cells)) if ok else MISSING)
        body.append(line)
    return _markdown(header, body)


def method_name(method) -> str:
    """The paper's spelling of a method name ("sparsegpt" -> "SparseGPT"); unknown names unchanged."""
    return METHOD_NAMES.get(str(method).lower(), str(method))


def _setting(record: Mapping) -> tuple[tuple, str]:
    """(sort key, column label) of a record's pattern and sparsity: "2:4", "4:8", or "50%" for unstructured."""
    pattern = record.get("pattern")
    sparsity = record.get("sparsity")
    if pattern not in (None, "", "unstructured", "dense"):
        text = str(pattern)
        n, sep, m = text.partition(":")
        if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) <= int(m)):
            raise LLMPruneError(f"record pattern {pattern!r} is neither 'unstructured' nor N:M such as 2:4")
        return (1, 1 - int(n) / int(m), -int(m)), f"{int(n)}:{int(m)}"
    if sparsity is None:
        sparsity = 0.0 if pattern == "dense" or str(record.get("method", "")).lower() == "dense" else None
    if not _is_number(sparsity) or not (0.0 <= float(sparsity) <= 1.0):
        raise LLMPruneError(
            f"record sparsity must be a fraction in [0, 1], got {sparsity!r} ({record.get('method')!r})")
    return (0, float(sparsity), 0), f"{100 * float(sparsity):g}%"


def _ppl_value(v):
    """A perplexity given as a number or as perplexity()'s result dict ({"ppl": x, ...})."""
    if isinstance(v, Mapping):
        v = v.get("ppl")
    return v if _is_number(v) else None


def ppl_table(records: Sequence[Mapping], *, datasets: Sequence[str] | None = None, fmt: str = "{:.2f}") -> str:
    """Perplexity table, methods x (pattern/sparsity), from result records
    `{"method": "wanda", "pattern": "unstructured" | "2:4" | ..., "sparsity": 0.5, "ppl": {"wikitext2": x, ...}}`.

    Columns: unstructured settings by increasing sparsity ("50%"), then N:M patterns ("4:8", "2:4"); with several
    datasets (all found, or `datasets`) each column is "<setting> <dataset>". A dense record (method "dense" or
    sparsity 0) fills its row in every column, as the papers' Dense row does. Rows keep the order in which
    methods first appear, Dense first. A repeated (method, setting) keeps the last record."""
    records = list(records)
    if not records:
        raise LLMPruneError("ppl_table needs at least one record")
    found: list[str] = []
    settings: dict[str, tuple] = {}
    methods: list[str] = []
    cells: dict[tuple[str, str, str], float | None] = {}
    dense_rows: set[str] = set()
    for r in records:
        if not isinstance(r, Mapping) or "method" not in r or not isinstance(r.get("ppl"), Mapping):
            raise LLMPruneError(f"a perplexity record needs 'method' and a 'ppl' mapping, got {r!r}")
        method = method_name(r["method"])
        key, col = _setting(r)
        if method not in methods:
            methods.append(method)
        if method == "Dense" or (key[0] == 0 and key[1] == 0.0):
            dense_rows.add(method)
        else:
            settings[col] = key
        for ds, v in r["ppl"].items():
            if ds not in found:
                found.append(ds)
            if (method, col, ds) in cells:
                log.warning("repeated record for %s %s on %s: keeping the last", method, col, ds)
            cells[(method, col, ds)] = _ppl_value(v)
    use = list(datasets) if datasets is not None else found
    cols = sorted(settings, key=settings.get)
    if not cols:  # only dense records: one column per setting they name
        cols = sorted({col for (_, col, _) in cells})
    many = len(use) > 1
    columns = [f"{c} {ds}" if many else c for c in cols for ds in use]
    rows = []
    for method in sorted(methods, key=lambda m: m != "Dense"):
        values = {}
        for c in cols:
            for ds in use:
                label = f"{c} {ds}" if many else c
                if method in dense_rows and (method, c, ds) not in cells:
                    got = [v for (mm, _, d), v in cells.items() if mm == method and d == ds]
                    values[label] = got[-1] if got else None
                else:
                    values[label] = cells.get((method, c, ds))
        rows.append((method, values))
    return results_table(rows, columns, mean=False, fmt=fmt)


__all__ = ["results_table", "ppl_table", "method_name", "METHOD_NAMES", "MISSING"]
