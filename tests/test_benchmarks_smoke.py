"""Each benchmark's tiny CPU smoke mode runs end to end and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, outputs", [
    ("cpu_quality_speed.py", ["smoke_cpu_smollm2_quality.json", "smoke_cpu_smollm2_wanda_speed.json"]),
    ("cpu_blocks.py", ["smoke_cpu_smollm2_blocks.json"]),
    ("gpu_bench.py", ["smoke_gpu_ppl_throughput_tiny.json", "smoke_gpu_prune_tiny.json"]),
])
def test_benchmark_smoke_mode(script, outputs, tmp_path):
    args = ["ppl", "prune"] if script == "gpu_bench.py" else ["--data-dir", str(data_dir())]
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
    if script == "cpu_quality_speed.py":
        q = json.loads((tmp_path / outputs[0]).read_text())
        assert {(row["method"], row["pattern"]) for row in q["rows"]} >= {("wanda", "2:4"), ("sparsegpt", "unstructured")}
        s = json.loads((tmp_path / outputs[1]).read_text())
        assert s["ratio_to_floor"] > 0 and s["floor_two_forward_passes_seconds"] > 0
