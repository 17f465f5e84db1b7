"""Before/after check on the embedded default model: the full prune job (the CLI's own path: BOS policy, chunked
logits, GGUF cache, output checks) against the numbers committed before those changes.

Runs `run_prune_job` for the dense model and each (method, pattern) of `SETTINGS`, with the quality benchmark's
protocol (32 x 512 C4 calibration windows, seed 0; WikiText-2 first 32 windows of 512), and compares each
perplexity with the same cell of `benchmarks/results/cpu_smollm2_quality.json` (written by cpu_quality_speed.py
before the change). Writes benchmarks/results/cpu_smollm2_unchanged.json.

    python benchmarks/cpu_unchanged.py [--settings wanda:unstructured,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.config import CalibrationConfig, EvalConfig, PruneConfig  # noqa: E402
from llmprune.pipeline import run_prune_job  # noqa: E402
from llmprune.versions import package_versions  # noqa: E402

DEFAULT_SETTINGS = "magnitude:unstructured,wanda:unstructured,ria:unstructured,sparsegpt:unstructured,wanda:2:4"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help="method:pattern, comma-separated")
    p.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--before", default=str(ROOT / "benchmarks" / "results" / "cpu_smollm2_quality.json"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_smollm2_unchanged.json"))
    a = p.parse_args(argv)
    before = json.loads(Path(a.before).read_text())
    old = {(r["method"], r["pattern"]): r["wikitext2"] for r in before["rows"]}
    calib = CalibrationConfig(source="c4", nsamples=32, seqlen=512, seed=0, data_dir=a.data_dir)
    ev = EvalConfig(datasets=("wikitext2",), seqlen=512, max_windows=32, data_dir=a.data_dir)
    rows = []
    for i, spec in enumerate(a.settings.split(",")):
        method, _, pattern = spec.partition(":")
        cfg = PruneConfig(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None,
                          device="cpu")
        t = time.perf_counter()
        rec = run_prune_job(None, cfg, calib, ev, eval_dense=(i == 0))
        ppl = rec.perplexity
        if i == 0:
            d = ppl.dense["wikitext2"]
            rows.append({"method": "dense", "pattern": "-", "before": old[("dense", "-")], "after": d["ppl"],
                         "bos": d.get("bos")})
        r = ppl.pruned["wikitext2"]
        rows.append({"method": method, "pattern": pattern, "before": old.get((method, pattern)), "after": r["ppl"],
                     "bos": r.get("bos"), "calibration_sha256": rec.calibration.token_sha256 if rec.calibration else None,
                     "seconds": time.perf_counter() - t})
        print(f"{method:10s} {pattern:12s} before {rows[-1]['before']} after {r['ppl']}", flush=True)
    for r in rows:
        r["equal"] = r["before"] is not None and abs(r["after"] - r["before"]) <= 1e-9 * abs(r["before"])
    out = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
           "protocol": {"calibration": "32 x 512 C4, seed 0", "eval": "WikiText-2 test, first 32 windows of 512"},
           "before_file": Path(a.before).name, "before_calibration_sha256": before["calibration"]["token_sha256"],
           "rows": rows, "versions": package_versions()}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
