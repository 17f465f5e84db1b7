"""Readable output: log lines and progress bars share stderr without overwriting each other (in a terminal and in a
redirected log), --quiet hides every bar, results.md/sweep.md headers, and plots that stay readable."""

import contextlib
import io
import logging
import math
import os
import re
from itertools import combinations

import pytest

import llmprune.progress as progress_mod
from llmprune.cli import main
from llmprune.evaluation.harness import results_header
from llmprune.progress import LogBar, live_bars, progress

from conftest import data_dir

BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's "  40%|####      | 2/5 [" part


def _screen(text: str) -> list[str]:
    """What a terminal shows for `text`: each "\\n"-ended line with "\\r" moving back to column 0 and later
    characters overwriting earlier ones; trailing blanks dropped."""
    lines = []
    for raw in text.split("\n"):
        cells: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        lines.append("".join(cells).rstrip())
    return lines


@contextlib.contextmanager
def _cli_logging():
    """The CLI's own logging set-up as in a fresh process: pytest's handlers off the root logger while `main`
    runs basicConfig (which does nothing when the root has handlers), then everything as it was; yields the
    messages that llmprune's loggers emitted."""
    root, lib = logging.getLogger(), logging.getLogger("llmprune")
    saved, level = root.handlers[:], root.level
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    collect = _Collect(logging.INFO)
    root.handlers[:] = []
    lib.addHandler(collect)
    try:
        yield messages
    finally:
        lib.removeHandler(collect)
        root.handlers[:] = saved
        root.setLevel(level)


def _prune(model_dir, *extra) -> list[str]:
    """A tiny job that runs every kind of library bar: block-kl's cache (calibration runner), skip-one and logits
    bars (block states), magnitude's block bar (pruner) and the perplexity bar; llmprune logs while bars are open."""
    return ["--model", str(model_dir), "--method", "magnitude", "--drop-blocks", "1", "--block-method", "block-kl",
            "--calib-data", "c4", "--data-dir", str(data_dir()), "--nsamples", "4", "--seqlen", "32",
            "--eval-max-windows", "2", "--device", "cpu", *extra]


BAR_NAMES = ("block-kl: cache", "block-kl: skip one", "block-kl: logits", "magnitude: blocks", "perplexity wikitext2")


def test_log_lines_print_above_live_bars_not_into_them(tiny_model_dir, capsys, monkeypatch):
    """With live bars (a terminal, forced here by LLMPRUNE_PROGRESS=1), every log message is a whole line of
    what the terminal shows; without tqdm's logging redirection the same job glues messages to a bar."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")
    capsys.readouterr()
    with _cli_logging() as messages:
        assert main(_prune(tiny_model_dir)) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err  # no cursor moves: "\r" and "\n" are all the terminal has to interpret
    assert all(f"\r{name}" in err for name in BAR_NAMES)  # the bars were live ...
    assert any(m.startswith("block 1/2") for m in messages)  # ... while the runner logged each block
    screen = _screen(err)
    assert messages and all(m in screen for m in messages), [m for m in messages if m not in screen]
    assert not [line for line in screen if BAR.search(line) and any(m in line for m in messages)]

    monkeypatch.setattr(progress_mod, "logging_redirect_tqdm", contextlib.nullcontext)  # what the check catches
    with _cli_logging() as messages:
        assert main(_prune(tiny_model_dir)) == 0
    screen = _screen(capsys.readouterr().err)
    assert [line for line in screen if BAR.search(line) and any(m in line for m in messages)]


def test_redirected_log_has_plain_bar_lines(tiny_model_dir, capsys, monkeypatch):
    """stderr not a terminal: no carriage return or cursor move at all; each line is a log message or a bar's
    state (here one per update, LOG_INTERVAL being 0)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("LLMPRUNE_PROGRESS", raising=False)
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL", 0.0)
    capsys.readouterr()
    with _cli_logging() as messages:
        assert main(_prune(tiny_model_dir)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.split("\n") if line]
    bar_lines = [line for line in lines if line not in messages]
    assert bar_lines and all(BAR.search(line) and line.startswith(BAR_NAMES) for line in bar_lines), bar_lines
    assert all(m in lines for m in messages) and any(m.startswith("block 1/2") for m in messages)


def test_quiet_hides_every_bar(tiny_model_dir, capsys, monkeypatch):
    """-q: no bar at all, even where bars would be live; TQDM_DISABLE is as it was once main returns."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")
    capsys.readouterr()
    assert main(_prune(tiny_model_dir, "-q")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and not BAR.search(err) and not any(name in err for name in BAR_NAMES), err
    assert "TQDM_DISABLE" not in os.environ


def test_progress_modes(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("LLMPRUNE_PROGRESS", raising=False)
    tty, log = Tty(), io.StringIO()
    assert live_bars(tty) and not live_bars(log)
    for _ in progress(range(3), desc="live", file=tty, mininterval=0):
        pass
    assert "\rlive: 100%|" in tty.getvalue()
    quick = progress(range(3), desc="quick", file=log)
    assert isinstance(quick, LogBar)
    for _ in quick:  # faster than LOG_INTERVAL: no line at all
        pass
    assert log.getvalue() == ""
    for _ in progress(range(3), desc="slow", file=log, interval=0.0):
        pass
    assert all(line.startswith("slow: ") and BAR.search(line) for line in log.getvalue().splitlines())
    assert [int(re.search(r"(\d+)/3", ln).group(1)) for ln in log.getvalue().splitlines()] == [1, 2, 3]
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")
    assert live_bars(log)
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "0")
    assert progress(range(3), file=tty).disable
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # --quiet wins over a forced bar
    assert progress(range(3), file=tty).disable and not live_bars(tty)


def test_log_bar_prints_at_most_every_interval_and_how_it_ended(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = LogBar(total=10, desc="steps", file=log, interval=30.0, mininterval=0)
    for step in range(10):
        clock[0] += 10.0  # 10 s per step: a line at steps 3, 6 and 9, then the end at 10
        bar.update(1)
        bar.refresh()  # what tqdm.write does around a log line: never an extra or a repeated line
    bar.close()
    counts = [int(re.search(r"(\d+)/10", line).group(1)) for line in log.getvalue().splitlines()]
    assert counts == [3, 6, 9, 10] and "\r" not in log.getvalue()


# ---------------------------------------------------------------- results.md and sweep.md headers

def _ppl(windows=3, seqlen=32):
    return {"ppl": 12.0, "seqlen": seqlen, "windows": windows}


def _task(n, avail=3270, metric="acc"):
    return {"acc": 0.5, "acc_stderr": 0.1, "metric": metric, "n": n, "n_available": avail}


def test_results_header_title_metric_window_limit_and_small_limit_warning():
    res = {"perplexity": {"wikitext2": _ppl()}, "zero_shot": {"tasks": {"boolq": _task(4), "rte": _task(4, 277)}}}
    head = results_header("Evaluation of m", [res], limit=4, max_windows=3)
    lines = head.splitlines()
    assert lines[0] == "# Evaluation of m" and lines[1] == "" and head.endswith("\n\n")
    assert "  - perplexity on WikiText-2: exp of the mean next-token negative log-likelihood, lower is better" in lines
    assert "  - zero-shot accuracy in % (lm-eval `acc`), higher is better, on BoolQ, RTE" in lines
    assert ("- Window: 32 tokens per perplexity window, non-overlapping (WikiText-2: 3 windows, `--max-windows 3`)"
            in lines)
    assert "- Zero-shot examples: `--limit 4`, the first 4 examples of each task" in lines
    warn = [line for line in lines if line.startswith("> **Warning:**")]
    # the largest standard error on 4 examples: sqrt(0.5 * 0.5 / 3) = 28.9 points
    assert len(warn) == 1 and "with 4 examples per task (fewer than 100)" in warn[0] and "up to 29 points" in warn[0]

    big = {"zero_shot": {"tasks": {"boolq": _task(500)}}}
    assert "Warning" not in results_header("t", [big], limit=500)
    whole = {"zero_shot": {"tasks": {"rte": _task(277, 277)}}}  # --limit above the task's size: all scored
    assert "Warning" not in results_header("t", [whole], limit=50)
    head = results_header("t", [{"perplexity": {"wikitext2": _ppl(), "c4": _ppl(256)}}])
    assert "perplexity on WikiText-2, C4:" in head and "(WikiText-2: 3 windows, C4: 256 windows)" in head
    assert "- `--limit`: none (no zero-shot task)" in head
    assert "- Zero-shot examples: all, no `--limit`" in results_header("t", [big])
    assert "no zero-shot task was evaluated" in results_header("t", [{"perplexity": {"c4": _ppl()}}], limit=4)


# ---------------------------------------------------------------- plots

TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
         "mlp.down_proj"]


def _no_overlap(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    return all(not a.overlaps(b) for a, b in combinations(boxes, 2))


@pytest.mark.parametrize("blocks", [40, 130])
def test_layer_sparsity_heat_map_stays_readable(blocks):
    pytest.importorskip("matplotlib")
    from llmprune.reporting.plots import MAX_BLOCK_TICKS, layer_sparsity_figure

    layers = {f"model.layers.{b}.{t}": 0.4 + 0.001 * b + 0.01 * i for b in range(blocks) for i, t in enumerate(TYPES)}
    assert len(layers) >= 240
    fig = layer_sparsity_figure(layers, title="Wanda 2:4")
    w, h = fig.get_size_inches()
    assert w <= 16 and h <= 9
    ax = fig.axes[0]
    (image,) = ax.get_images()
    grid = image.get_array()
    assert grid.shape == (len(TYPES), blocks)
    assert grid[2, 7] == pytest.approx(100 * layers[f"model.layers.7.{TYPES[2]}"])  # row = type, column = block
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "layer type"
    assert [t.get_text() for t in ax.get_yticklabels()] == TYPES
    fig.canvas.draw()
    xt = [t for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(xt) <= MAX_BLOCK_TICKS and _no_overlap(xt) and _no_overlap(ax.get_yticklabels())
    assert fig.axes[1].get_ylabel() == "sparsity (%)"  # the colour bar
    assert "Wanda 2:4" in ax.get_title() and f"{len(layers)} layers" in ax.get_title()


def test_layer_sparsity_without_blocks_falls_back_to_bars():
    pytest.importorskip("matplotlib")
    from llmprune.reporting.plots import layer_sparsity_figure

    fig = layer_sparsity_figure({"encoder.proj": 0.5, "lm_head": 0.25})
    ax = fig.axes[0]
    assert not ax.get_images() and [p.get_height() for p in ax.patches] == [50.0, 25.0]


@pytest.mark.parametrize("method, unit, scores", [
    ("block-influence", "unitless", [0.021, 0.3, 0.024, 0.05, 0.023]),
    ("block-ppl", "perplexity", [25.0, 25.4, 27.9, 26.1, 25.2]),
    ("block-kl", "nats per token", [0.52, 0.2, float("inf"), 0.25, 0.31]),
])
def test_block_scores_axis_names_the_unit_and_zooms_on_the_scores(method, unit, scores):
    pytest.importorskip("matplotlib")
    from llmprune.blocks.plot import MARGIN, block_scores_figure

    fig = block_scores_figure({"method": method, "scores": scores, "removed": [1], "protected": [0]})
    ax = fig.axes[0]
    assert unit in ax.get_ylabel()
    finite = [s for s in scores if math.isfinite(s)]
    lo, hi = min(finite), max(finite)
    bottom, top = ax.get_ylim()
    assert bottom <= lo and top >= hi  # every finite score is inside ...
    assert bottom >= lo - MARGIN * (hi - lo) - 1e-12 and top <= hi + MARGIN * (hi - lo) + 1e-12  # ... zoomed
    fig.canvas.draw()
    assert _no_overlap(ax.get_xticklabels())


def test_2_4_points_are_named_in_the_legend():
    pytest.importorskip("matplotlib")
    from llmprune.reporting.plots import ppl_vs_sparsity_figure

    records = [{"method": "dense", "pattern": "unstructured", "sparsity": 0.0, "ppl": {"wikitext2": 20.0}},
               {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "ppl": {"wikitext2": 30.0}},
               {"method": "wanda", "pattern": "unstructured", "sparsity": 0.7, "ppl": {"wikitext2": 80.0}},
               {"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "ppl": {"wikitext2": 45.0}},
               {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5, "ppl": {"wikitext2": 40.0}},
               {"method": "sparsegpt", "pattern": "4:8", "sparsity": 0.5, "ppl": {"wikitext2": 35.0}}]
    fig = ppl_vs_sparsity_figure(records)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["Wanda (unstructured)", "Wanda 2:4 (50 %)", "SparseGPT 2:4 (50 %)", "SparseGPT 4:8 (50 %)",
                     "Dense 20.00"]


def test_other_libraries_bars_are_routed_through_progress(monkeypatch):
    """transformers' GGUF loader makes its bar with its own tqdm global: while a GGUF model loads it is
    llmprune.progress's, so -q hides it and a log gets plain lines; afterwards it is transformers' own again."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    from llmprune.models.load import _gguf_bars

    own = gguf.tqdm
    with _gguf_bars():
        assert gguf.tqdm is progress
        monkeypatch.setenv("TQDM_DISABLE", "1")
        assert gguf.tqdm(range(3), desc="Converting").disable
    assert gguf.tqdm is own


def test_every_llmprune_bar_goes_through_progress(tmp_path, capsys, monkeypatch):
    """No module but llmprune.progress makes tqdm bars itself (so -q and log bars apply to all); e.g. the GGUF
    cache's sha256 bar is hidden by TQDM_DISABLE even where bars are live."""
    from pathlib import Path

    import llmprune
    from llmprune.gguf_cache import file_sha256

    root = Path(llmprune.__file__).parent
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "progress.py"
              and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(encoding="utf-8"), re.M)]
    assert direct == []
    f = tmp_path / "x.gguf"
    f.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")
    capsys.readouterr()
    file_sha256(f)
    assert "sha256 x.gguf" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    file_sha256(f)
    assert capsys.readouterr().err == ""
