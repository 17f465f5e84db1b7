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


def ppl_vs_sparsity_figure(records: Sequence[Mapping], dataset: str = "wikitext2"):
    """The Figure of :func:`plot_ppl_vs_sparsity` (not saved)."""
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
    from matplotlib.lines import Line2D

    fig = _figure(8.0, 4.4)
    ax = fig.add_subplot()
    colors = {}
    cycle = iter(_color_cycle())
    for method in list(lines) + [m for m in nm_points if m not in lines]:
        colors[method] = next(cycle)
    handles = []
    for method, points in lines.items():
        xs = sorted(points)
        handles += ax.plot([100 * x for x in xs], [points[x] for x in xs], marker="o", color=colors[method],
                           label=f"{method} (unstructured)")
    # N:M patterns: one marker shape per pattern, in the method's colour, each (method, pattern) a legend entry
    patterns = sorted({label for pts in nm_points.values() for _, _, label in pts},
                      key=lambda lab: (int(lab.split(":")[1]), lab))
    shapes = dict(zip(patterns, ["s", "D", "^", "v", "P", "X", "*", "h"] * 4))
    for method, points in nm_points.items():
        for sparsity, ppl, label in sorted(points, key=lambda p: patterns.index(p[2])):
            handles.append(ax.scatter([100 * sparsity], [ppl], marker=shapes[label], s=46, color=colors[method],
                                      edgecolors="black", linewidths=0.6, zorder=3,
                                      label=f"{method} {label} ({100 * sparsity:g} %)"))
    for method, ppl in dense:
        ax.axhline(ppl, color="0.4", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="0.4", linestyle=":", linewidth=1, label=f"{method} {ppl:.2f}"))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"perplexity on {dataset} (log scale)")
    ax.set_title(f"Perplexity vs. sparsity ({dataset})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def plot_ppl_vs_sparsity(records: Sequence[Mapping], path: str | os.PathLike, dataset: str = "wikitext2") -> Path:
    """Perplexity on `dataset` (log scale) against sparsity, one line per method over its unstructured records;
    N:M records are drawn as markers at their implied sparsity (one shape per pattern, in the method's colour),
    dense records as a dotted level; every line, N:M point and dense level is named in the legend beside the
    axes. Records as for `ppl_table`. Writes a PNG and returns its path."""
    return _save(ppl_vs_sparsity_figure(records, dataset), path)


def _color_cycle() -> list:
    from matplotlib import rcParams

    colors = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    return colors * 10


def _block_and_kind(name: str) -> tuple[int, str] | None:
    """(block index, layer type) of a layer name: the first all-digit part is the block, what follows is the
    type ("model.layers.12.self_attn.q_proj" -> (12, "self_attn.q_proj")); None without such a part."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:])
    return None


#: At most this many x tick labels on the per-layer plots (beyond it, every k-th block is labelled).
MAX_BLOCK_TICKS = 48


def _sparsity_values(layer_sparsity: Mapping[str, float]) -> dict[str, float]:
    if not layer_sparsity:
        raise LLMPruneError("plot_layer_sparsity needs at least one layer")
    values = {}
    for n, v in layer_sparsity.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LLMPruneError(f"layer {n!r}: sparsity must be a number, got {v!r}")
        values[n] = 100 * float(v)
    return values


def layer_sparsity_figure(layer_sparsity: Mapping[str, float], title: str | None = None):
    """The Figure of :func:`plot_layer_sparsity` (not saved)."""
    values = _sparsity_values(layer_sparsity)
    mean = sum(values.values()) / len(values)
    parsed = {n: _block_and_kind(n) for n in values}
    blocks = sorted({p[0] for p in parsed.values() if p is not None})
    head = f"Sparsity per layer{f' ({title})' if title else ''}: {len(values)} layers, mean {mean:.1f} %"
    if len(blocks) >= 2 and all(p is not None for p in parsed.values()):
        return _sparsity_heat_map(values, parsed, blocks, head)
    return _sparsity_bars(values, mean, head)


def _sparsity_heat_map(values: dict[str, float], parsed: dict, blocks: list[int], head: str):
    """Heat map: rows = layer types (in forward order), columns = blocks, colour = sparsity (%), the values
    written in the cells when there are few; a layer missing from a block is left blank."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    kinds = list(dict.fromkeys(k for _, k in parsed.values()))
    col = {b: j for j, b in enumerate(blocks)}
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for name, (b, k) in parsed.items():
        grid[kinds.index(k), col[b]] = values[name]
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    if hi - lo < 1.0:  # one value everywhere (N:M): a one-point band, not a stretched colour scale
        lo, hi = max(0.0, lo - 0.5), min(100.0, hi + 0.5)
    fig = _figure(min(16.0, max(6.4, 3.0 + 0.2 * len(blocks))), min(9.0, max(3.2, 1.6 + 0.28 * len(kinds))))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=lo, vmax=hi)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7 if len(kinds) <= 30 else 5)
    if len(kinds) > 60:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=30, integer=True))
    if len(blocks) <= MAX_BLOCK_TICKS:
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    else:
        step = -(-len(blocks) // MAX_BLOCK_TICKS)
        ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
    if len(blocks) <= 16 and len(kinds) <= 16:  # few cells: their values too
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if v < lo + 0.6 * (hi - lo) else "black")
    ax.set_xlabel("block")
    ax.set_ylabel("layer type")
    ax.set_title(head, fontsize=10)
    fig.colorbar(image, ax=ax, label="sparsity (%)", pad=0.01)
    return fig


def _sparsity_bars(values: dict[str, float], mean: float, head: str):
    """One bar per layer in forward order, coloured by the layer's last name (e.g. q_proj), mean dashed."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(values)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    palette = dict(zip(dict.fromkeys(kinds), _color_cycle()))
    fig = _figure(min(16.0, max(6.4, 0.12 * len(names) + 2)), 4.2)
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, [values[n] for n in names], width=0.85, color=[palette[k] for k in kinds])
    ax.axhline(mean, color="0.2", linestyle="--", linewidth=1)
    handles = [Line2D([], [], color="0.2", linestyle="--", linewidth=1, label=f"mean {mean:.1f}%")]
    handles += [Patch(color=color, label=kind) for kind, color in palette.items()]
    if len(names) <= 40:
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, max(100.0, max(values.values()) * 1.05))
    ax.set_title(head, fontsize=10)
    ax.legend(handles=handles, fontsize=7, ncol=min(4, len(handles)), loc="upper right")
    return fig


def plot_layer_sparsity(layer_sparsity: Mapping[str, float], path: str | os.PathLike,
                        title: str | None = None) -> Path:
    """Sparsity (%) of each pruned layer: for block layers ("<...>.<block>.<type>") a heat map of layer type x
    block, readable at hundreds of layers; otherwise one bar per layer in the given (forward) order, coloured by
    the layer's kind, with the mean dashed. `title` names the run (e.g. "Wanda 2:4"). Writes a PNG and returns
    its path."""
    return _save(layer_sparsity_figure(layer_sparsity, title), path)


__all__ = ["plot_ppl_vs_sparsity", "plot_layer_sparsity", "ppl_vs_sparsity_figure", "layer_sparsity_figure"]
