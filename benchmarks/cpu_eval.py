"""Evaluation harness on the default model (CPU, float32):

* the dense WikiText-2 perplexity (seqlen 512, first 32 windows) from llmprune's harness against an independent
  plain loop (transformers' own `labels=` loss per window, averaged), to 4 significant digits;
* zero-shot accuracy (lm-eval, local task files) of the dense model and of Wanda 50 % (32 x 512 C4 calibration),
  on the first `--limit` examples of each task.

    python benchmarks/cpu_eval.py [--limit 200] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_quality_speed import environment, setup, write_json  # noqa: E402

import llmprune  # noqa: E402
from llmprune.calibration import load_calibration  # noqa: E402
from llmprune.config import PruneConfig  # noqa: E402
from llmprune.evaluation.harness import evaluate, results_markdown  # noqa: E402

TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@torch.no_grad()
def plain_loop_ppl(model, tok, data_dir: str, seqlen: int, windows: int) -> float:
    """An independent computation: read the test rows, join, tokenize, and average HF's own loss per window."""
    import json

    rows = [json.loads(line)["text"] for line in open(Path(data_dir) / "wikitext2" / "wikitext-2-raw-v1.test.jsonl")]
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids
    losses = []
    for i in range(windows):
        x = ids[:, i * seqlen : (i + 1) * seqlen]
        losses.append(model(input_ids=x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = p.parse_args(argv)
    model, tok, name, calib_cfg, seqlen, windows = setup(a.smoke, a.data_dir)
    limit = 4 if a.smoke else a.limit
    tasks = TASKS[:2] if a.smoke else TASKS
    t = time.perf_counter()
    dense = evaluate(model, tok, ["wikitext2"] + tasks, seqlen=seqlen, max_windows=windows, limit=limit,
                     data_dir=a.data_dir)
    dense_seconds = time.perf_counter() - t
    plain = plain_loop_ppl(model, tok, a.data_dir, seqlen, windows)
    harness = dense["perplexity"]["wikitext2"]["ppl"]
    agree = f"{harness:.4g}" == f"{plain:.4g}"
    print(f"dense wikitext2 ppl: harness {harness:.6f}, plain loop {plain:.6f}, equal to 4 significant digits: {agree}",
          flush=True)
    pruned = copy.deepcopy(model)
    llmprune.prune(pruned, PruneConfig(method="wanda", sparsity=0.5, device="cpu"), load_calibration(calib_cfg, tok))
    t = time.perf_counter()
    wanda = evaluate(pruned, tok, ["wikitext2"] + tasks, seqlen=seqlen, max_windows=windows, limit=limit,
                     data_dir=a.data_dir)
    wanda_seconds = time.perf_counter() - t
    table = results_markdown([("Dense", dense), ("Wanda 50 %", wanda)])
    print(table, flush=True)
    write_json(Path(a.out) / f"{'smoke_' if a.smoke else ''}cpu_smollm2_eval.json", {
        "model": name, "ppl_check": {"harness": harness, "plain_loop": plain, "seqlen": seqlen, "windows": windows,
                                     "equal_to_4_significant_digits": agree},
        "zero_shot_limit": limit, "tasks": tasks, "dense": dense, "wanda_50": wanda, "table": table,
        "seconds": {"dense": dense_seconds, "wanda": wanda_seconds}, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
