"""PNG plots of results: perplexity against sparsity per method (as in Wanda, Sun et al. 2023, Fig. 2), and the
sparsity of each pruned layer. matplotlib is imported inside the functions and drives a Figure on its Agg
canvas directly, so no pyplot state or global backend is touched."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import LLMPruneError
from .tables import _ppl_value, _setting, method_name

log = logging.getLogger(__name__)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LLMPruneError("plots need matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    log.info("wrote %s", p)
    return p


def plot_ppl_vs_sparsity(records: Sequence[Mapping], path: str | os.PathLike, dataset: str = "wikitext2") -> Path:
    """Perplexity on `dataset` (log scale) against sparsity, one line per method over its unstructured records;
    N:M records are drawn as separate markers at their implied sparsity, dense records as a dotted level.
    Records as for `ppl_table`. Writes a PNG and returns its path."""
    lines: dict[str, dict[float, float]] = {}
    nm_points: dict[str, list[tuple[float, float, str]]] = {}
    dense: list[tuple[str, float]] = []
    for r in records:
        if not isinstance(r, Mapping) or not isinstance(r.get("ppl"), Mapping) or "method" not in r:
            raise LLMPruneError(f"a perplexity record needs 'method' and a 'ppl' mapping, got {r!r}")
        ppl = _ppl_value(r["ppl"].get(dataset))
        if ppl is None:
            continue
        method = method_name(r["method"])
        (kind, sparsity, _), label = _setting(r)
        if method == "Dense" or (kind == 0 and sparsity == 0.0):
            dense.append((method, ppl))
        elif kind == 1:
            nm_points.setdefault(method, []).append((sparsity, ppl, label))
        else:
            lines.setdefault(method, {})[sparsity] = ppl
    if not (lines or nm_points or dense):
        raise LLMPruneError(f"no record has a perplexity on {dataset!r}")

    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    colors = {}
    cycle = iter(_color_cycle())
    for method in list(lines) + [m for m in nm_points if m not in lines]:
        colors[method] = next(cycle)
    for method, points in lines.items():
        xs = sorted(points)
        ax.plot([100 * x for x in xs], [points[x] for x in xs], marker="o", color=colors[method], label=method)
    for method, points in nm_points.items():
        for sparsity, ppl, label in points:
            ax.scatter([100 * sparsity], [ppl], marker="s", s=40, color=colors[method], zorder=3)
            ax.annotate(f"{method} {label}", (100 * sparsity, ppl), textcoords="offset points", xytext=(5, 4),
                        fontsize=7, color=colors[method])
    for method, ppl in dense:
        ax.axhline(ppl, color="0.4", linestyle=":", linewidth=1)
        ax.annotate(f"{method} {ppl:.2f}", (0, ppl), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(3, 3), fontsize=7, color="0.3")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"perplexity on {dataset} (log scale)")
    ax.set_title(f"Perplexity vs. sparsity ({dataset})")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _color_cycle() -> list:
    from matplotlib import rcParams

    colors = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return colors * 10


def plot_layer_sparsity(layer_sparsity: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Sparsity (%) of each pruned layer, in the given (forward) order, one bar per layer, coloured by the layer's
    kind (its last name, e.g. q_proj), with the overall mean as a dashed line. Writes a PNG and returns its path."""
    if not layer_sparsity:
        raise LLMPruneError("plot_layer_sparsity needs at least one layer")
    names = list(layer_sparsity)
    values = []
    for n in names:
        v = layer_sparsity[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LLMPruneError(f"layer {n!r}: sparsity must be a number, got {v!r}")
        values.append(100 * float(v))
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    palette = dict(zip(dict.fromkeys(kinds), _color_cycle()))

    fig = _figure(min(16.0, max(6.4, 0.12 * len(names) + 2)), 4.2)
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, values, width=0.85, color=[palette[k] for k in kinds])
    mean = sum(values) / len(values)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.axhline(mean, color="0.2", linestyle="--", linewidth=1)
    handles = [Line2D([], [], color="0.2", linestyle="--", linewidth=1, label=f"mean {mean:.1f}%")]
    handles += [Patch(color=color, label=kind) for kind, color in palette.items()]
    if len(names) <= 40:
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, max(100.0, max(values) * 1.05))
    ax.set_title(f"Sparsity per layer ({len(names)} layers)")
    ax.legend(handles=handles, fontsize=7, ncol=min(4, len(handles)), loc="upper right")
    return _save(fig, path)


__all__ = ["plot_ppl_vs_sparsity", "plot_layer_sparsity"]
