"""Render the README's result tables from benchmarks/results/*.json (never typed by hand).

    python benchmarks/render_readme.py        # rewrites the marked sections of README.md in place
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def quality_table(data: dict) -> str:
    rows = data["rows"]
    patterns = ["unstructured", "2:4"]
    by = {(r["method"], r["pattern"]): r for r in rows}
    dense = next(r for r in rows if r["method"] == "dense")
    ev, cal = data["eval"], data["calibration"]
    out = [f"WikiText-2 perplexity of {data['model']}, first {ev['windows']} windows of {ev['seqlen']} tokens; "
           f"calibration {cal['nsamples']} x {cal['seqlen']} C4 tokens, seed 0, float32, CPU "
           f"(`benchmarks/results/cpu_smollm2_quality.json`).", "",
           "| Method | Comparison group | 50 % unstructured | 2:4 | prune time, unstructured (s) |",
           "|---|---|---:|---:|---:|",
           f"| Dense | - | {dense['wikitext2']:.2f} | {dense['wikitext2']:.2f} | - |"]
    for method in ("magnitude", "wanda", "ria", "sparsegpt"):
        cells = [by.get((method, p)) for p in patterns]
        if not any(cells):
            continue
        group = next(c for c in cells if c).get("group", "-")
        vals = [f"{c['wikitext2']:.2f}" if c else "-" for c in cells]
        t = f"{cells[0]['prune_seconds']:.1f}" if cells[0] else "-"
        out.append(f"| {method.capitalize() if method != 'ria' else 'RIA'} | {group} | {vals[0]} | {vals[1]} | {t} |"
                   .replace("Sparsegpt", "SparseGPT"))
    return "\n".join(out)


def speed_table(data: dict) -> str:
    b = data["wanda_breakdown"]
    return "\n".join([
        f"Wanda 50 % on {data['model']}, {data['calibration']['nsamples']} x {data['calibration']['seqlen']} tokens, "
        f"CPU ({data['environment']['threads']} threads), model load excluded "
        f"(`benchmarks/results/cpu_smollm2_wanda_speed.json`).", "",
        "| Two plain forward passes (s) | Wanda (s) | Ratio | Target |", "|---:|---:|---:|---:|",
        f"| {data['floor_two_forward_passes_seconds']:.1f} | {min(data['wanda_seconds']):.1f} | "
        f"{data['ratio_to_floor']:.3f} | <= {data['target_ratio']} |", "",
        f"Breakdown of one Wanda run: calibrate {b['calibrate']:.1f} s, score and mask {b['prune']:.1f} s, "
        f"propagate {b['propagate']:.1f} s, total {b['prune_total']:.1f} s.",
    ])


SECTIONS = {
    "cpu-quality": ("cpu_smollm2_quality.json", quality_table),
    "cpu-speed": ("cpu_smollm2_wanda_speed.json", speed_table),
}


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for key, (fname, render) in SECTIONS.items():
        path = RESULTS / fname
        if not path.is_file():
            print(f"skip {key}: {path} not found", file=sys.stderr)
            continue
        table = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- BEGIN {key} -->\n).*?(<!-- END {key} -->)", re.S)
        if not pattern.search(text):
            print(f"skip {key}: no markers in README.md", file=sys.stderr)
            continue
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
