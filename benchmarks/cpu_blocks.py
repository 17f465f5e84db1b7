"""Block removal on the default model (SmolLM2-135M, 30 blocks, float32, CPU): for each block scorer, the blocks
it removes at K = 2, 4, 6 (one-shot), the WikiText-2 perplexity (seqlen 512, first 32 windows) and the scoring
time. Calibration: `--nsamples` (8) C4 windows of 512 tokens, seed 0 (Shortened LLaMA scored with 10 x 128 tokens).

    python benchmarks/cpu_blocks.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_quality_speed import environment, setup, write_json  # noqa: E402

from llmprune.blocks import score_blocks  # noqa: E402
from llmprune.blocks.removal import remove_blocks  # noqa: E402
from llmprune.blocks.select import lowest_blocks  # noqa: E402
from llmprune.calibration import load_calibration  # noqa: E402
from llmprune.evaluation.perplexity import load_eval_tokens, perplexity  # noqa: E402

METHODS = ("block-influence", "block-ppl", "block-kl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 tokens for scoring")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = p.parse_args(argv)
    model, tok, name, calib_cfg, eval_seqlen, eval_windows = setup(a.smoke, a.data_dir)
    if not a.smoke:
        calib_cfg = dataclasses.replace(calib_cfg, nsamples=a.nsamples)
    ks = (1,) if a.smoke else (2, 4, 6)
    calib = load_calibration(calib_cfg, tok)
    ids, where = load_eval_tokens("wikitext2", tok, a.data_dir)
    dense = perplexity(model, ids, eval_seqlen, max_windows=eval_windows)["ppl"]
    print(f"dense ppl {dense:.3f}", flush=True)
    rows, all_scores = [], {}
    for method in METHODS:
        t = time.perf_counter()
        scores = score_blocks(model, method, calib.tokens, device="cpu")
        seconds = time.perf_counter() - t
        for k in ks:
            removed = lowest_blocks(scores, k, ())
            m = copy.deepcopy(model)
            remove_blocks(m, removed)
            ppl = perplexity(m, ids, eval_seqlen, max_windows=eval_windows)["ppl"]
            rows.append({"method": method, "k": k, "removed": sorted(removed), "wikitext2": ppl,
                         "scoring_seconds": seconds})
            print(f"{method:16s} K={k} removed {sorted(removed)} ppl {ppl:.3f} (scoring {seconds:.1f} s)", flush=True)
            del m
        all_scores[method] = scores
    write_json(Path(a.out) / f"{'smoke_' if a.smoke else ''}cpu_smollm2_blocks.json", {
        "model": name, "calibration": calib.to_dict(), "num_blocks": len(scores),
        "eval": {"dataset": "wikitext2", "source": where, "seqlen": eval_seqlen, "windows": eval_windows},
        "dense_wikitext2": dense, "rows": rows, "scores": all_scores, "selection": "one-shot, no protected blocks",
        "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
