"""CPU benchmark on the embedded default model (SmolLM2-135M-Instruct, float32):

* quality: WikiText-2 perplexity (first 32 windows of 512 tokens) of the dense model and of magnitude, Wanda,
  RIA and SparseGPT at 50 % unstructured and 2:4, calibrated on 32 C4 windows of 512 tokens, seed 0;
* speed: Wanda's wall time (model load excluded) against two plain batched forward passes of the same
  calibration windows through the same model, measured in the same run.

    python benchmarks/cpu_quality_speed.py [--only quality|speed] [--smoke]

Writes benchmarks/results/cpu_smollm2_quality.json and cpu_smollm2_wanda_speed.json (or a tiny model's
results under --out with --smoke, which the tests run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmprune  # noqa: E402
from llmprune.calibration import load_calibration  # noqa: E402
from llmprune.config import CalibrationConfig, PruneConfig  # noqa: E402
from llmprune.evaluation.perplexity import load_eval_tokens, perplexity  # noqa: E402
from llmprune.models import load_model  # noqa: E402
from llmprune.versions import package_versions  # noqa: E402

SETTINGS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("ria", "unstructured"),
            ("sparsegpt", "unstructured"), ("magnitude", "2:4"), ("wanda", "2:4"), ("ria", "2:4"), ("sparsegpt", "2:4")]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "versions": package_versions()}


@torch.no_grad()
def plain_forward_seconds(model, tokens: torch.Tensor, batch_size: int) -> float:
    t = time.perf_counter()
    for b0 in range(0, tokens.shape[0], batch_size):
        model(input_ids=tokens[b0 : b0 + batch_size], use_cache=False)
    return time.perf_counter() - t


def setup(smoke: bool, data_dir: str | None):
    if smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model("llama", vocab_size=len(tok))
        calib = CalibrationConfig(source="c4", nsamples=4, seqlen=32, seed=0, data_dir=data_dir)
        return model, tok, "tiny-llama (smoke)", calib, 32, 2
    loaded = load_model(None, torch.float32)
    calib = CalibrationConfig(source="c4", nsamples=32, seqlen=512, seed=0, data_dir=data_dir)
    return loaded.model, loaded.tokenizer, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)", calib, 512, 32


def run_quality(model, tok, name, calib_cfg, eval_seqlen, eval_windows, data_dir) -> dict:
    calib = load_calibration(calib_cfg, tok)
    ids, where = load_eval_tokens("wikitext2", tok, data_dir)
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0,
             "wikitext2": perplexity(model, ids, eval_seqlen, max_windows=eval_windows)["ppl"]}]
    for method, pattern in SETTINGS:
        m = copy.deepcopy(model)
        cfg = PruneConfig(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None,
                          device="cpu")
        rep = llmprune.prune(m, cfg, calib)
        r = perplexity(m, ids, eval_seqlen, max_windows=eval_windows)
        rows.append({"method": method, "pattern": pattern, "sparsity": rep.sparsity, "group": cfg.group,
                     "wikitext2": r["ppl"], "prune_seconds": rep.timings["prune_total"]})
        print(f"{method:10s} {pattern:12s} ppl {r['ppl']:10.3f}  ({rep.timings['prune_total']:.1f} s)", flush=True)
        del m
    return {"model": name, "calibration": calib.to_dict(),
            "eval": {"dataset": "wikitext2", "source": where, "seqlen": eval_seqlen, "windows": eval_windows},
            "rows": rows, "environment": environment()}


def run_speed(model, tok, name, calib_cfg, repeats: int = 2) -> dict:
    calib = load_calibration(calib_cfg, tok)
    cfg = PruneConfig(method="wanda", sparsity=0.5, device="cpu")
    batch = cfg.batch_size or max(1, min(calib.nsamples, 16384 // calib.seqlen))
    plain_forward_seconds(model, calib.tokens[:1], 1)  # warm-up
    fwd = [plain_forward_seconds(model, calib.tokens, min(batch, 8)) for _ in range(repeats)]
    wanda = []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        rep = llmprune.prune(m, cfg, calib)
        wanda.append(rep.timings)
        del m
    floor = 2 * min(fwd)
    best = min(w["prune_total"] for w in wanda)
    out = {"model": name, "calibration": calib.to_dict(), "plain_forward_seconds": fwd,
           "plain_forward_batch_size": min(batch, 8), "floor_two_forward_passes_seconds": floor,
           "wanda_seconds": [w["prune_total"] for w in wanda], "wanda_breakdown": wanda[0],
           "wanda_calibration_batch_size": batch, "ratio_to_floor": best / floor, "target_ratio": 1.25,
           "environment": environment()}
    print(f"two plain forward passes {floor:.1f} s; wanda {best:.1f} s; ratio {best / floor:.3f} (target <= 1.25)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["quality", "speed"], default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny model, seconds; for the tests")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, name, calib, eval_seqlen, eval_windows = setup(a.smoke, a.data_dir)
    out = Path(a.out)
    prefix = "smoke_" if a.smoke else ""
    if a.only in (None, "quality"):
        write_json(out / f"{prefix}cpu_smollm2_quality.json",
                   run_quality(model, tok, name, calib, eval_seqlen, eval_windows, a.data_dir))
    if a.only in (None, "speed"):
        write_json(out / f"{prefix}cpu_smollm2_wanda_speed.json", run_speed(model, tok, name, calib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
