"""Each benchmark's tiny CPU smoke mode runs end to end and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, outputs", [
    ("cpu_quality_speed.py", ["smoke_cpu_smollm2_quality.json", "smoke_cpu_smollm2_wanda_speed.json"]),
    ("cpu_blocks.py", ["smoke_cpu_smollm2_blocks.json"]),
    ("gpu_bench.py", ["smoke_gpu_ppl_throughput_tiny.json", "smoke_gpu_prune_tiny.json", "smoke_gpu_mask_selection.json"]),
])
def test_benchmark_smoke_mode(script, outputs, tmp_path):
    args = ["ppl", "prune", "select"] if script == "gpu_bench.py" else ["--data-dir", str(data_dir())]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for name in outputs:
        data = json.loads((tmp_path / name).read_text())
        assert data["environment"]["versions"]["torch"]
    if script == "gpu_bench.py":
        rows = json.loads((tmp_path / outputs[1]).read_text())["rows"]
        assert {(r["method"], r["pattern"]) for r in rows} == {(m, p) for m in ("magnitude", "wanda", "ria", "sparsegpt")
                                                               for p in ("unstructured", "2:4")}
        assert all(r["memory_terms"]["block_weights_bytes"] > 0 for r in rows)
        sel = json.loads((tmp_path / outputs[2]).read_text())["rows"]
        assert len(sel) == 4 and all(r["topk_ms"] > 0 and r["sort_ms"] > 0 for r in sel)
    if script == "cpu_quality_speed.py":
        q = json.loads((tmp_path / outputs[0]).read_text())
        assert {(row["method"], row["pattern"]) for row in q["rows"]} >= {("wanda", "2:4"), ("sparsegpt", "unstructured")}
        s = json.loads((tmp_path / outputs[1]).read_text())
        assert s["ratio_to_floor"] > 0 and s["floor_two_forward_passes_seconds"] > 0


def test_host_built_model_matches_a_normally_built_one_in_structure_and_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    a = gpu_bench.build_on_host("tiny", torch.device("cpu"), torch.float32)
    b = gpu_bench.build("tiny", "cpu", torch.float32)
    assert {n: p.shape for n, p in a.named_parameters()} == {n: p.shape for n, p in b.named_parameters()}
    assert all(p.device.type == "cpu" for p in a.parameters())
    torch.testing.assert_close(a.model.rotary_emb.inv_freq, b.model.rotary_emb.inv_freq)  # not left uninitialized
    out = a(torch.randint(0, 128, (2, 16))).logits
    assert torch.isfinite(out).all() and out.std() > 0


def test_stats_compile_probe_smoke(tmp_path):
    """The compiled-statistics probe: its sums of squares equal the eager hooks' and one graph serves 3 blocks."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_stats_compile.py"), "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "smoke_gpu_stats_compile_tiny.json").read_text())
    sq = data["variants"]["compiled+hooks sqnorm"]
    assert sq["max_rel_err_vs_eager"] < 1e-5 and sq["dynamo_stats"]["unique_graphs"] == 1
    assert data["wanda_mask_agreement_compiled_vs_eager"] == 1.0
    assert all(v["median_s"] > 0 for k, v in data["variants"].items() if "error" not in v)
