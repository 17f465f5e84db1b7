"""Reporting: results as JSON, Markdown tables and PNG plots generated from those results (never typed by hand)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..outputs import write_text_atomic
from .plots import plot_layer_sparsity, plot_ppl_vs_sparsity
from .tables import method_name, ppl_table, results_table

log = logging.getLogger(__name__)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON atomically: into a temporary file beside `path`, flushed to disk, then
    renamed over it with os.replace, so readers see the old file or the new one, never half of one. Parent
    folders are created; values JSON cannot hold are written with str(); non-finite floats follow Python's
    json (NaN, Infinity). Returns the path."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=str) + "\n"  # fails before anything is written
    write_text_atomic(p, text)
    log.debug("wrote %s", p)
    return p


__all__ = ["write_json", "results_table", "ppl_table", "method_name", "plot_ppl_vs_sparsity", "plot_layer_sparsity"]
