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
           f"(`benchmarks/results/cpu_smollm2_quality.json`). Prune times are wall times on a 2-core machine that other "
           f"jobs shared during this run; the speed section below has a quiet measurement.", "",
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


def unchanged_table(data: dict) -> str:
    same = sum(r["equal"] for r in data["rows"])
    out = [f"The full prune job (the CLI's path, with the BOS policy, chunked logits and the GGUF cache) against the "
           f"numbers of `benchmarks/results/{data['before_file']}` committed before those changes: {data['model']}, "
           f"{data['protocol']['calibration']}, {data['protocol']['eval']}; {same} of {len(data['rows'])} equal to "
           f"1e-9 relative (`python benchmarks/cpu_unchanged.py` -> `benchmarks/results/cpu_smollm2_unchanged.json`).",
           "", "| Method | Pattern | Before | After | BOS policy | Equal |", "|---|---|---:|---:|---|:---:|"]
    for r in data["rows"]:
        bos = r.get("bos") or {}
        out.append(f"| {r['method']} | {r['pattern']} | {r['before']:.4f} | {r['after']:.4f} | "
                   f"{bos.get('policy', '-')} ({bos.get('resolved', '-')}) | {'yes' if r['equal'] else 'no'} |")
    for c in data.get("controls", []):
        out += ["", f"Control for {c['method']} {c['pattern']}: the code before these changes ({c['code']}) gives "
                    f"{c['wikitext2']:.4f} on this machine ({c['threads']} threads): {c['meaning']}."]
    return "\n".join(out)


def stats_compile_table(data: dict) -> str:
    v = data["variants"]
    rates = data["matmul_rate_tflops"]
    out = [f"One {data['shape']} block, bf16, {data['windows']} x {data['seqlen']} tokens in batches of {data['batch']}, "
           f"{data['device']}; floor of one pass {data['floor_one_pass_s']:.3f} s at the median bf16 matmul rate "
           f"{data['rate_median_tflops']:.0f} TFLOP/s ({len(rates)} measurements, {min(rates):.0f}-{max(rates):.0f}) "
           f"measured in the same run (`python benchmarks/gpu_stats_compile.py` -> "
           f"`benchmarks/results/gpu_stats_compile_{data['shape']}.json`).", "",
           "| One pass over the calibration set | Time (s) | x floor |", "|---|---:|---:|"]
    for name, r in v.items():
        if "median_s" in r:
            out.append(f"| {name} | {r['median_s']:.3f} | {r['x_floor']:.2f} |")
    c = v.get("compiled+hooks sqnorm", {})
    if "first_call_s" in c:
        out += ["", f"The compiled variants compile once ({c['first_call_s']:.1f} s at the first call; blocks 2 and 3 then "
                    f"take {c['blocks_2_and_3_first_call_s']:.2f} s: one graph serves every block). Wanda masks (50 %, "
                    f"per row) from the compiled statistics agree with the eager ones on "
                    f"{100 * data['wanda_mask_agreement_compiled_vs_eager']:.4f} % of the weights."]
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


def eval_table(data: dict) -> str:
    c = data["ppl_check"]
    return "\n".join([
        f"Dense WikiText-2 perplexity (seqlen {c['seqlen']}, first {c['windows']} windows): harness "
        f"{c['harness']:.4f}, independent plain loop (transformers' own `labels=` loss) {c['plain_loop']:.4f}; "
        f"equal to 4 significant digits: {'yes' if c['equal_to_4_significant_digits'] else 'NO'}.", "",
        f"Zero-shot accuracy (%, lm-eval `acc`, 0-shot, **first {data['zero_shot_limit']} examples of each task**, "
        f"local task files; CPU, float32; `benchmarks/results/cpu_smollm2_eval.json`):", "",
        data["table"]])


def blocks_table(data: dict) -> str:
    out = [f"{data['model']}, {data['num_blocks']} blocks; scores on {data['calibration']['nsamples']} x "
           f"{data['calibration']['seqlen']} C4 tokens; WikiText-2 perplexity, seqlen {data['eval']['seqlen']}, first "
           f"{data['eval']['windows']} windows (dense {data['dense_wikitext2']:.2f}); {data['selection']} "
           f"(`benchmarks/results/cpu_smollm2_blocks.json`).", "",
           "| Scorer | K | Blocks removed | WikiText-2 ppl | Scoring time (s) |", "|---|---:|---|---:|---:|"]
    for r in data["rows"]:
        out.append(f"| {r['method']} | {r['k']} | {', '.join(map(str, r['removed']))} | {r['wikitext2']:.2f} | "
                   f"{r['scoring_seconds']:.1f} |")
    return "\n".join(out)


def gpu_ppl_table(data: dict) -> str:
    env = data["environment"]
    return "\n".join([
        f"{env['device']}, torch {env['versions']['torch']}, CUDA {env['torch_cuda']}; bf16 matmul measured in the same "
        f"run: {env['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s (`benchmarks/results/gpu_ppl_throughput_llama2-7b.json`). "
        f"Floor = 2 x (linear-layer + LM-head parameters) x tokens at that rate; counting all "
        f"{data['all_parameters'] / 1e9:.2f} B parameters (embeddings too) it would be "
        f"{100 * data['fraction_of_floor_rate_all_parameters']:.1f} %.",
        "", "| Model shape | Tokens | Batch | Forward | Tokens/s | Floor tokens/s | Fraction of floor | Target |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
        f"| {data['shape']} (random weights, bf16) | {data['tokens']:,} ({data['windows']} x {data['seqlen']}) | "
        f"{data['batch_size']} | eager | {data['eager_tokens_per_s']:,.0f} | {data['floor_tokens_per_s']:,.0f} | "
        f"{100 * data['eager_fraction_of_floor_rate']:.1f} % | |",
        f"| | | | `--compile` (blocks compiled; the first run took {data['compile_seconds']:.1f} s with compiling, "
        f"then {data['tokens'] / data['tokens_per_s']:.1f} s) | {data['tokens_per_s']:,.0f} | "
        f"{data['floor_tokens_per_s']:,.0f} | **{100 * data['fraction_of_floor_rate']:.1f} %** | >= "
        f"{100 * data['target_fraction']:.0f} % |"])


def _gib(x) -> str:
    return f"{x / 2**30:.2f}" if x else "-"


def gpu_prune_table(data: dict) -> str:
    """All gpu_prune_*.json files: one row per model shape x method x pattern, then the memory terms."""
    files = sorted(RESULTS.glob("gpu_prune_*.json"))
    env = data["environment"]
    out = [f"{env['device']}, torch {env['versions']['torch']}, CUDA {env['torch_cuda']}, bf16, random weights at "
           "real shapes, 128 x 2048 random calibration tokens, blocks kept in host memory and moved to the GPU one at "
           "a time (the next one prefetched, the last one copied back, on a side stream); floor = two forward passes "
           "(linear layers and attention) at the bf16 matmul rate measured in the same run. Targets (issue 5): Wanda "
           "and RIA <= 1.2x, SparseGPT <= 4x the floor, peak GPU <= 6 GiB at 7B. Files: "
           + ", ".join(f"`benchmarks/results/{f.name}`" for f in files) + ".", "",
           "| Shape | Method | Pattern | Wall (s) | Floor (s) | x floor | Calibrate / prune / propagate (s) | Peak GPU (GiB) | Peak host RSS (GiB) |",
           "|---|---|---|---:|---:|---:|---|---:|---:|"]
    mem = []
    for f in files:
        d = json.loads(f.read_text())
        shape = f.stem.removeprefix("gpu_prune_")
        for r in d["rows"]:
            t = r["timings"]
            cap = f" (GPU capped at {r['gpu_cap_bytes'] / 2**30:.0f} GiB; weights {r['weights_bytes'] / 2**30:.1f} GiB)" \
                if r.get("gpu_cap_bytes") else ""
            out.append(f"| {shape}{cap} | {r['method']} | {r['pattern']} | {r['wall_seconds']:.1f} | "
                       f"{r['floor_seconds']:.1f} | {r['ratio_to_floor']:.2f} | {t['calibrate']:.1f} / {t['prune']:.1f} / "
                       f"{t['propagate']:.1f} | {_gib(r['peak_gpu_bytes'])} | {_gib(r['peak_host_rss_bytes'])} |")
            m = r.get("memory_terms")
            if m and r["method"] in ("wanda", "sparsegpt") and r["pattern"] == "unstructured":
                mem.append(f"| {shape} | {r['method']} | {_gib(r['peak_gpu_bytes'])} | "
                           f"{m['blocks_on_gpu_max']} x {_gib(m['block_weights_bytes'])} | {_gib(m['activations_bytes'])} "
                           f"+ {_gib(m['one_batch_outputs_bytes'])} | {_gib(m.get('workspace_bytes'))} |")
    out += ["", "Peak GPU memory by term (GiB): blocks' weights (one coming, one in use, one going back), the "
            "calibration activations (outputs replace inputs batch by batch, plus one batch of outputs), and the rest "
            "(one batch's intermediate tensors, float32 statistics or Hessians, masks).", "",
            "| Shape | Method | Peak | Block weights | Activations | Workspace |", "|---|---|---:|---:|---:|---:|", *mem]
    return "\n".join(out)


def sparse24_table(data: dict) -> str:
    env, acc, mem = data["environment"], data["accuracy"], data["memory"]
    out = [f"{env['device']}, torch {env['versions']['torch']}, CUDA {env['torch_cuda']}; Llama-2-7B shape, bf16, random "
           "weights made 2:4 by magnitude; median latency in ms (decode: ms per token, 32 tokens after a 128-token "
           "prompt). e = eager, g = CUDA graph, f = CUDA graph with the causal mask skipped under capture (SDPA's flash "
           "kernel); speedup = best dense / best 2:4 for prefill, same mode for decode "
           "(`benchmarks/results/gpu_sparse24_llama2-7b.json`).", "",
           "| Workload | Dense e / g / f | 2:4 e / g / f | Speedup | Target | Met |", "|---|---|---|---:|---:|:---:|"]

    spread: list[str] = []

    def ms(row, k):
        v = row.get(k)
        return f"{v['median_ms']:.2f}" if isinstance(v, dict) and "median_ms" in v else "-"

    for kind, label, target in (("prefill", "prefill 2048 tokens", 1.2), ("decode", "decode", 1.0)):
        for b, row in data[kind].items():
            sp = row["speedup"]
            if kind == "prefill":
                speed, ok = f"{sp['best']:.3f}", sp["best"] >= target
            else:  # kernel time: CUDA graph; 0.5 % is the run-to-run floor of identical kernels
                speed = " / ".join(f"{m[0]} {sp[m]:.3f}" for m in ("eager", "graph"))
                ok = None
                met_modes = " / ".join(f"{m[0]} {'yes' if sp[m] >= target / 1.005 else '**no**'}" for m in ("graph", "eager"))
                ctl = row["sparse"].get("control_forced_dense", {}).get("eager")
                if ctl and row["dense"].get("eager"):
                    spread.append(f"batch {b[1:]}: {min(ctl['runs_ms']):.1f}-{max(ctl['runs_ms']):.1f} ms against "
                                  f"dense {min(row['dense']['eager']['runs_ms']):.1f}-"
                                  f"{max(row['dense']['eager']['runs_ms']):.1f} ms")
            met = met_modes if ok is None else ("yes" if ok else "**no**")
            out.append(f"| {label}, batch {b[1:]} | {ms(row['dense'], 'eager')} / {ms(row['dense'], 'graph')} / "
                       f"{ms(row['dense'], 'graph_flash')} | {ms(row['sparse'], 'eager')} / {ms(row['sparse'], 'graph')} / "
                       f"{ms(row['sparse'], 'graph_flash')} | {speed} | {target:.1f} | {met} |")
    lg, fl, pl = acc["logits"]["mode_sparse"], acc["bf16_floor"]["dense_bf16_vs_fp32"], acc["per_layer"]
    out += ["", "Decode: below the measured token count the converted layers run the dense kernel, so under CUDA "
            "graphs (kernel time, as decode is served) 2:4 equals dense. Eager decoding is bound by the host's "
            "Python and its timings spread widely on the benchmark machine; the converted model forced to run the "
            "very dense kernels was as slow as its 2:4 runs (" + "; ".join(spread) + "), so the eager gap is host "
            "time, not kernels: not resolved (the 2:4 rows are timed after the dense ones, not interleaved)."
            if spread else "", "",
            f"Outputs: every converted layer forced sparse, the logits differ from the dense 2:4 model's by "
            f"{lg['rel_error']:.2e} (relative; top-1 agreement {lg['top1_agreement']:.3f}), less than dense bf16 differs "
            f"from the same model in float32 ({fl['rel_error']:.2e}, top-1 {fl['top1_agreement']:.3f}): random 32-layer "
            f"models amplify rounding. Per layer, sparse vs dense: at most {pl['max_rel_err_sparse_vs_dense']:.1e}. "
            f"Memory: weights {mem['allocated_dense_bytes'] / 2**30:.1f} GiB dense, "
            f"{mem['allocated_sparse_bytes'] / 2**30:.1f} GiB after conversion (compressed weights "
            f"{mem['conversion']['compressed_bytes'] / 2**30:.1f} GiB plus the dense copies kept for the token counts "
            f"where cuSPARSELt is slower)."]
    return "\n".join(out)


def repro_table(data: dict) -> str:
    from llmprune.recipe import ordering_checks, render_orderings

    ok = data["counts"]["ok"]
    return "\n".join([f"{data['title']}: {ok} cells run (`python -m llmprune reproduce recipes/smollm2 --output-dir "
                      f"benchmarks/results/reproduce_smollm2`; WikiText-2 perplexity, lower is better; "
                      f"`benchmarks/results/reproduce_smollm2/`).", "", render_orderings(ordering_checks(data["cells"])).rstrip()])


SECTIONS = {
    "cpu-eval": ("cpu_smollm2_eval.json", eval_table),
    "cpu-blocks": ("cpu_smollm2_blocks.json", blocks_table),
    "gpu-ppl": ("gpu_ppl_throughput_llama2-7b.json", gpu_ppl_table),
    "gpu-prune": ("gpu_prune_llama2-7b.json", gpu_prune_table),
    "repro-smollm2": ("reproduce_smollm2/results.json", repro_table),
    "gpu-sparse24": ("gpu_sparse24_llama2-7b.json", sparse24_table),
    "cpu-quality": ("cpu_smollm2_quality.json", quality_table),
    "cpu-speed": ("cpu_smollm2_wanda_speed.json", speed_table),
    "cpu-unchanged": ("cpu_smollm2_unchanged.json", unchanged_table),
    "gpu-stats-compile": ("gpu_stats_compile_llama2-7b.json", stats_compile_table),
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
