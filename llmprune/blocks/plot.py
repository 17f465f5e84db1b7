"""Bar plot of block scores from a `prune_blocks` report (matplotlib is imported here, where it is used)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import LLMPruneError

log = logging.getLogger(__name__)


def plot_block_scores(report: dict, path: str | os.PathLike) -> Path:
    """Write a PNG with one bar chart per scoring round: importance per original block index, the removed
    block(s) of the round in red, protected blocks hatched. Returns the path written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LLMPruneError("plotting needs matplotlib: pip install matplotlib") from None
    rounds = report.get("rounds") or [{"blocks": list(range(len(report["scores"]))), "scores": report["scores"],
                                       "removed": report.get("removed", [])}]
    protected = set(report.get("protected", ()))
    method = report.get("method", "")
    fig = Figure(figsize=(max(6.0, 0.3 * len(rounds[0]["blocks"]) + 2), 2.6 * len(rounds)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rounds), 1, squeeze=False)[:, 0]
    for r, (ax, rnd) in enumerate(zip(axes, rounds)):
        removed = set(rnd["removed"])
        colors = ["tab:red" if i in removed else "tab:blue" for i in rnd["blocks"]]
        bars = ax.bar([str(i) for i in rnd["blocks"]], rnd["scores"], color=colors)
        for i, bar in zip(rnd["blocks"], bars):
            if i in protected:
                bar.set_hatch("//")
        title = f"{method}: block importance" + (f", round {r + 1}" if len(rounds) > 1 else "")
        ax.set_title(f"{title} (red: removed" + (", hatched: protected)" if protected else ")"))
        ax.set_ylabel("score")
    axes[-1].set_xlabel("block (original index)")
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    log.info("wrote %s", out)
    return out
