"""Bar plot of block scores from a `prune_blocks` report (matplotlib is imported here, where it is used)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ..errors import LLMPruneError
from .base import BLOCK_SCORERS

log = logging.getLogger(__name__)

#: Fraction of the scores' range left free below and above them on the y axis.
MARGIN = 0.1


def score_limits(scores) -> tuple[float, float] | None:
    """y limits that zoom on the finite `scores`: their range widened by MARGIN of it on each side (by 5 % of
    the value, or 1, when all are equal), not below 0 when no score is negative. None without a finite score."""
    finite = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    pad = MARGIN * (hi - lo) if hi > lo else (0.05 * abs(hi) or 1.0)
    bottom = lo - pad
    if lo >= 0 and bottom < 0:
        bottom = 0.0
    return bottom, hi + pad


def block_scores_figure(report: dict):
    """The Figure of :func:`plot_block_scores` (not saved)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LLMPruneError("plotting needs matplotlib: pip install matplotlib") from None
    rounds = report.get("rounds") or [{"blocks": list(range(len(report["scores"]))), "scores": report["scores"],
                                       "removed": report.get("removed", [])}]
    protected = set(report.get("protected", ()))
    method = report.get("method", "")
    unit = BLOCK_SCORERS.get(method).unit if method in BLOCK_SCORERS else "score"
    fig = Figure(figsize=(min(16.0, max(6.0, 0.3 * len(rounds[0]["blocks"]) + 2)), 2.6 * len(rounds) + 0.4),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rounds), 1, squeeze=False)[:, 0]
    for r, (ax, rnd) in enumerate(zip(axes, rounds)):
        removed = set(rnd["removed"])
        limits = score_limits(rnd["scores"])
        top = limits[1] if limits else 1.0
        bad = [s is None or not math.isfinite(float(s)) for s in rnd["scores"]]
        heights = [top if b else float(s) for s, b in zip(rnd["scores"], bad)]  # non-finite: a grey bar to the top
        colors = ["0.75" if b else "tab:red" if i in removed else "tab:blue" for i, b in zip(rnd["blocks"], bad)]
        bars = ax.bar([str(i) for i in rnd["blocks"]], heights, color=colors)
        for i, bar, b, s in zip(rnd["blocks"], bars, bad, rnd["scores"]):
            if i in protected:
                bar.set_hatch("//")
            if b:
                ax.annotate("nan" if s is None or math.isnan(float(s)) else "inf", (bar.get_x() + bar.get_width() / 2,
                            top), ha="center", va="top", fontsize=7, xytext=(0, -2), textcoords="offset points")
        if limits:
            ax.set_ylim(*limits)
        title = f"{method}: block importance" + (f", round {r + 1}" if len(rounds) > 1 else "")
        ax.set_title(f"{title} (red: removed" + (", hatched: protected)" if protected else ")"), fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xlabel("block (original index)")
    return fig


def plot_block_scores(report: dict, path: str | os.PathLike) -> Path:
    """Write a PNG with one bar chart per scoring round: importance per original block index, the removed
    block(s) of the round in red, protected blocks hatched, non-finite scores as grey bars marked inf/nan. The y
    axis names the scorer's unit (`BlockScorer.unit`) and zooms on the round's scores (`score_limits`), since
    importances often differ in the third digit. Returns the path written."""
    fig = block_scores_figure(report)
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    log.info("wrote %s", out)
    return out
