"""2:4 acceleration (llmprune.accelerate): decision oracles, CPU fallback, dispatch, and the benchmark smoke."""

import ast
import copy
import importlib
import importlib.util
import json
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmprune import accelerate as s24
from llmprune.accelerate import ops, timing
from llmprune.errors import LLMPruneError
from llmprune.masks import apply_mask_, nm_mask
from llmprune.models import find_blocks, linear_layers

from conftest import calib_tokens, tiny_model

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def mask_2of4_(model, skip=()):
    with torch.no_grad():
        for i, block in enumerate(find_blocks(model).modules):
            for name, layer in linear_layers(block).items():
                if (i, name) not in skip:
                    apply_mask_(layer.weight.data, nm_mask(layer.weight.data.abs(), 2, 4))
    return model


# ---------------------------------------------------------------- pure helpers

def test_is_2of4_detects_groups_along_the_input_dimension():
    w = torch.randn(8, 16)
    assert not s24.is_2of4(w)
    apply_mask_(w, nm_mask(w.abs(), 2, 4))
    assert s24.is_2of4(w)
    w[3, 4:8] = torch.tensor([1.0, 0.0, 2.0, 3.0])  # 3 non-zeros in one group of 4
    assert not s24.is_2of4(w)
    assert not s24.is_2of4(torch.zeros(4, 6))  # width not a multiple of 4
    assert s24.is_2of4(torch.zeros(4, 8))  # fewer than 2 non-zeros is still 2:4


def test_group_by_shape_keys_and_order():
    layers = {"a": nn.Linear(16, 32), "b": nn.Linear(32, 16), "c": nn.Linear(16, 32, bias=False),
              "d": nn.Linear(16, 32).to(torch.bfloat16)}
    g = s24.group_by_shape(layers)
    assert list(g) == [(32, 16, "float32"), (16, 32, "float32"), (32, 16, "bfloat16")]
    assert g[(32, 16, "float32")] == ["a", "c"]
    assert s24.shape_key(layers["b"]) == (16, 32, "float32")


@pytest.mark.parametrize("m,mult,want", [(1, 8, 8), (8, 8, 8), (9, 8, 16), (2048, 8, 2048), (0, 8, 0), (17, 16, 32)])
def test_padded_tokens(m, mult, want):
    assert s24.padded_tokens(m, mult) == want


def test_dense_threshold_is_the_start_of_the_winning_suffix():
    ms = [1, 8, 32, 2048]
    dense = [1.0, 1.0, 1.0, 10.0]
    assert s24.dense_threshold(ms, dense, [2.0, 2.0, 0.9, 6.0], 1.03) == 32
    assert s24.dense_threshold(ms, dense, [0.5, 0.5, 0.5, 5.0], 1.03) == 1  # wins everywhere
    assert s24.dense_threshold(ms, dense, [0.5, 2.0, 0.5, 5.0], 1.03) == 32  # a loss at 8 splits the suffix
    assert s24.dense_threshold(ms, dense, [0.5, 0.5, 0.5, 11.0], 1.03) is None  # loses at the largest M
    assert s24.dense_threshold(ms, dense, [0.5, 0.5, None, 5.0], 1.03) == 2048  # unmeasured = a loss
    assert s24.dense_threshold(ms, dense, [2.0, 2.0, 0.98, 9.8], 1.03) is None  # 2 % faster is under the margin
    assert s24.dense_threshold(ms, dense, None) is None


def test_decide_dispatch_backend_choice_and_policies():
    ms = [1, 32, 2048]
    dense = {"eager": [1.0, 1.0, 10.0], "graph": [0.5, 0.6, 10.0]}
    sparse = {"cusparselt": {"eager": [3.0, 3.0, 7.0], "graph": [0.8, 0.5, 6.0]},
              "cutlass": {"eager": [3.0, 3.0, 8.0], "graph": [0.8, 0.8, 8.0]}}
    d = s24.decide(ms, dense, sparse)
    assert d["decision"] == "dispatch" and d["backend"] == "cusparselt" and d["keep_dense"]
    assert d["dense_below"] == {"eager": 2048, "graph": 32}
    # the same timings under sparse-only: no dense copy allowed, sparse loses at M=1, so stay dense
    d2 = s24.decide(ms, dense, sparse, policy="sparse-only")
    assert d2["decision"] == "dense" and d2["backend"] is None and "sparse-only" in d2["reason"]
    # winning at every measured M: sparse only, the dense weight can go
    fast = {"cutlass": {"eager": [0.5, 0.5, 5.0], "graph": [0.4, 0.4, 5.0]}}
    d3 = s24.decide(ms, dense, fast, policy="sparse-only")
    assert d3 == {"decision": "sparse", "backend": "cutlass", "dense_below": {"eager": 0, "graph": 0},
                  "keep_dense": False, "reason": None}
    # never faster: dense, with a reason
    slow = {"cusparselt": {"eager": [2.0, 2.0, 12.0], "graph": [1.0, 1.0, 11.0]}}
    d4 = s24.decide(ms, dense, slow)
    assert d4["decision"] == "dense" and d4["backend"] is None and "not" in d4["reason"]


def test_decide_without_graph_timings_uses_eager_only():
    ms = [1, 2048]
    d = s24.decide(ms, {"eager": [1.0, 10.0], "graph": [None, None]},
                   {"cusparselt": {"eager": [2.0, 6.0], "graph": [None, None]}})
    assert d["decision"] == "dispatch" and d["dense_below"] == {"eager": 2048}
    assert s24.decide(ms, {"eager": None}, {})["reason"] == "no dense timing"


def test_shape_fits_and_dtype_refusal():
    assert s24.shape_fits("cusparselt", 4096, 11008, torch.bfloat16) is None
    assert s24.shape_fits("cutlass", 11008, 4096, torch.float16) is None
    assert "multiple" in s24.shape_fits("cutlass", 32, 48, torch.bfloat16)
    assert "float32" in s24.shape_fits("cusparselt", 64, 64, torch.float32)


@pytest.mark.parametrize("cap", [(9, 0), (10, 0), (8, 6)])
def test_cutlass_backend_is_refused_outside_compute_capability_8x(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    ok, why = s24.available_backends(torch.device("cuda"))
    if cap[0] == 8:
        assert "8.x" not in why.get("cutlass", "")
    else:
        assert "cutlass" not in ok and f"{cap[0]}.{cap[1]}" in why["cutlass"] and "8.x" in why["cutlass"]


def test_cslt_api_matches_the_op_schema():
    names = {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    api = s24.cslt_api()
    assert api in names or api == "basic"
    kw = ops._cslt_kwargs((3, 2, 1))
    assert kw.get("alg_id") == 3 and set(kw) <= names
    assert ops._cslt_kwargs(s24.DEFAULT_PLAN) == {}  # the default plan passes no optional keyword


# ---------------------------------------------------------------- the verb on the CPU

def test_cpu_fallback_leaves_model_and_outputs_unchanged():
    model = mask_2of4_(tiny_model("llama")).to(torch.bfloat16)
    ids = calib_tokens(n=2, seqlen=8)
    before = model(ids).logits
    types = [type(m) for m in model.modules()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    rep = s24.accelerate_2of4_(model)
    assert rep["status"] == "fallback" and rep["layers"]["replaced"] == 0
    assert rep["layers"]["eligible"] == rep["layers"]["total"] == 14
    assert ("CUDA" in rep["reason"]) or ("cpu" in rep["reason"])
    assert [type(m) for m in model.modules()] == types and [p.data_ptr() for p in model.parameters()] == ptrs
    assert torch.equal(model(ids).logits, before)
    json.dumps(rep)  # the report is JSON-ready


def test_non_2of4_and_float32_layers_are_skipped_with_reasons():
    model = mask_2of4_(tiny_model("llama").to(torch.bfloat16), skip={(0, "mlp.down_proj"), (1, "self_attn.q_proj")})
    eligible, skipped = s24.scan_layers(model)
    assert len(eligible) == 12 and set(skipped.values()) == {"not 2:4"}
    assert set(skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"}
    rep = s24.accelerate_2of4_(model)
    assert rep["layers"]["kept_dense_reasons"]["not 2:4"] == 2
    assert rep["layer_decisions"]["model.layers.0.mlp.down_proj"] == "dense: not 2:4"
    with pytest.raises(LLMPruneError, match="cannot be accelerated"):
        s24.accelerate_2of4_(model, require_all=True)
    fp32 = mask_2of4_(tiny_model("llama"))
    rep = s24.accelerate_2of4_(fp32)
    assert rep["status"] == "fallback" and "float32" in rep["reason"] and rep["layers"]["eligible"] == 0


@pytest.mark.parametrize("kw,match", [({"policy": "fastest"}, "known: dispatch"), ({"token_counts": [0, 8]}, "positive"),
                                      ({"token_counts": "abc"}, "positive"), ({"backends": ["triton"]}, "known: cusparselt"),
                                      ({"timing_modes": ["wall"]}, "timing_modes")])
def test_bad_arguments_raise_one_line_errors(kw, match):
    model = mask_2of4_(tiny_model("llama")).to(torch.bfloat16)
    with pytest.raises(LLMPruneError, match=match):
        s24.accelerate_2of4_(model, **kw)


# ---------------------------------------------------------------- the module's dispatch, with a CPU stand-in kernel

@pytest.fixture
def reference_kernel(monkeypatch):
    """Stand in for cuSPARSELt on the CPU: `packed` holds the dense weight; records the token counts it saw."""
    seen = []

    def mm(x2, packed, meta, bias, out_features, plan):
        seen.append((x2.shape[0], plan))
        return F.linear(x2, packed, bias)

    monkeypatch.setitem(ops._MM, "cusparselt", mm)
    return seen


def make_module(weight, bias, keep_dense, dense_below, plans=None):
    return s24.Sparse24Linear(weight.shape[1], weight.shape[0], weight.clone(), None, bias, "cusparselt",
                              weight=weight if keep_dense else None, dense_below=dense_below, plans=plans, pad_to=8)


def test_module_pads_dispatches_and_keeps_batch_dims(reference_kernel):
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    mod = make_module(lin.weight.data, lin.bias, True, {"eager": 32, "graph": 8}, plans={8: (5, 1, -1)})
    x = torch.randn(2, 3, 16)  # 6 tokens, below the eager threshold (32): dense
    assert torch.equal(mod(x), lin(x)) and reference_kernel == []
    mod.set_mode("graph")
    x = torch.randn(3, 3, 16)  # 9 tokens >= 8: sparse, padded to 16 rows, sliced back to 9
    y = mod(x)
    assert y.shape == (3, 3, 24) and reference_kernel[-1] == (16, s24.DEFAULT_PLAN)
    torch.testing.assert_close(y, lin(x))
    x = torch.randn(1, 8, 16)  # exactly the measured padded count: its searched plan is used
    torch.testing.assert_close(mod(x), lin(x))
    assert reference_kernel[-1] == (8, (5, 1, -1))
    mod.set_mode("dense")
    n = len(reference_kernel)
    x = torch.randn(4096, 16)
    assert torch.equal(mod(x), lin(x)) and len(reference_kernel) == n  # forced dense never calls the kernel
    mod.set_mode("sparse")
    x = torch.randn(1, 1, 16)  # one decode token: padded to 8, first row returned
    torch.testing.assert_close(mod(x), lin(x))
    assert reference_kernel[-1][0] == 8
    with pytest.raises(LLMPruneError, match="known: eager"):
        mod.set_mode("fast")


def test_module_without_dense_copy_always_runs_sparse(reference_kernel):
    lin = nn.Linear(16, 8, bias=False)
    mod = make_module(lin.weight.data, None, False, {"eager": 2048})
    assert mod.weight is None and mod.dense_below == {"eager": 0, "graph": 0}
    x = torch.randn(3, 16)
    torch.testing.assert_close(mod(x), lin(x))
    assert reference_kernel == [(8, s24.DEFAULT_PLAN)]
    assert mod(torch.randn(0, 16)).shape == (0, 8)


def test_mode_helpers_and_restore_dense(reference_kernel):
    model = tiny_model("llama")
    ids = calib_tokens(n=2, seqlen=8)
    ref = model(ids).logits
    q = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = make_module(q.weight.data, q.bias, True, {"eager": 1_000_000, "graph": 1})
    assert set(s24.sparse24_layers(model)) == {"model.layers.0.self_attn.q_proj"}
    assert torch.equal(model(ids).logits, ref) and reference_kernel == []  # eager: below threshold, dense
    with s24.sparse24_mode(model, "graph"):
        torch.testing.assert_close(model(ids).logits, ref)
        assert len(reference_kernel) == 1
    assert model.model.layers[0].self_attn.q_proj.mode == "eager"
    assert s24.set_sparse24_mode(model, "sparse") == "eager"
    assert s24.restore_dense_(model) == 1
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == q.weight.data_ptr()  # the kept copy, not a new one
    assert torch.equal(model(ids).logits, ref)


def test_custom_op_fake_shape_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = ops._ensure_op()
    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        packed = torch.empty(32 * 64 * 9 // 16, dtype=torch.bfloat16)
        y = op(x, packed, None, None, 32, "cusparselt", 0, 1, -1, 8)
    assert tuple(y.shape) == (5, 32) and y.dtype == torch.bfloat16


def test_measure_shape_cycles_the_copies_and_keeps_the_faster_plan_per_token_count(monkeypatch):
    """The timing loop on the CPU: stand-ins for compression (the dense weight), the kernel, the search and the
    CUDA-event timer, whose time depends only on the plan and rows it saw. The searched plan is faster only at
    24 rows: kept there, the default plan elsewhere; timed calls cycle through every weight copy, checks use one."""
    searched = (7, 1, -1)
    calls = []  # (inside a timing, packed tensor's address, plan, rows) per kernel call
    timing_now = {"on": False}
    packs = []

    def mm(x2, packed, meta, bias, out_features, plan):
        calls.append((timing_now["on"], packed.data_ptr(), tuple(plan), x2.shape[0]))
        return F.linear(x2, packed, bias)

    def compress(w, backend):
        packs.append(w.clone())
        return packs[-1], None

    def fake_time(fn, *, warmup, iters, repeats, graph):
        start = len(calls)
        timing_now["on"] = True
        for _ in range(iters):
            fn()
        timing_now["on"] = False
        seen = calls[start:]
        windows.append((graph, {c[2] for c in seen}, {c[1] for c in seen}))
        if not seen:  # dense F.linear
            return 1.0
        plan, rows = seen[0][2], seen[0][3]
        return 0.5 if (plan, rows) == (searched, 24) else 0.9 if plan == searched else 0.8

    windows = []
    monkeypatch.setitem(ops._MM, "cusparselt", mm)
    monkeypatch.setattr(timing, "compress_2of4", compress)
    monkeypatch.setattr(timing, "cslt_search", lambda packed, x2, bias: (searched, "stand-in search"))
    monkeypatch.setattr(timing, "cuda_time_ms", fake_time)
    torch.manual_seed(0)
    w, b = torch.randn(16, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    res = s24.measure_shape(w, b, [1, 8, 24], ["cusparselt"], iters=32, repeats=1)
    n = res["weight_copies"]
    assert n == 16 and len(packs) == n  # a tiny weight: the most copies (no CUDA L2 size here: 50 MB assumed)
    assert res["dense_ms"] == {"eager": [1.0] * 3, "graph": [1.0] * 3}
    assert res["sparse_ms"] == {"cusparselt": {"eager": [0.8, 0.8, 0.5], "graph": [0.8, 0.8, 0.5]}}
    assert res["plans"] == {"cusparselt": {24: searched}} and res["search_api"] == "stand-in search"
    assert res["errors"] == {} and res["rel_err"] == {"cusparselt": 0.0}
    sparse = [win for win in windows if win[1]]
    # per token count: the default and the searched plan by graph replay, then the winner eagerly
    assert [(g, p) for g, p, _ in sparse] == [(True, {s24.DEFAULT_PLAN}), (True, {searched}),
                                             (False, {s24.DEFAULT_PLAN})] * 2 + [
        (True, {s24.DEFAULT_PLAN}), (True, {searched}), (False, {searched})]
    every = {p.data_ptr() for p in packs}
    assert all(ptrs == every for _, _, ptrs in sparse)  # each timed loop runs every compressed copy
    checks = [c for c in calls if not c[0]]  # the setup check, then the searched plan's check at each count
    assert [(c[1], c[2]) for c in checks] == [(packs[0].data_ptr(), s24.DEFAULT_PLAN)] + [
        (packs[0].data_ptr(), searched)] * 3


# ---------------------------------------------------------------- the benchmark's smoke mode

def test_benchmark_smoke_writes_the_expected_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_sparse24", ROOT / "benchmarks" / "gpu_sparse24.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "smoke_gpu_sparse24_tiny.json").read_text())
    for key in ("environment", "config", "mask", "conversion", "kernels", "prefill", "decode", "accuracy", "memory",
                "targets", "errors"):
        assert key in data, key
    assert data["errors"] == []
    assert data["environment"]["versions"]["torch"] and data["environment"]["device"] == "cpu"
    assert data["mask"]["all_2of4"] and data["conversion"]["status"] == "fallback"
    assert set(data["prefill"]) == {"b1", "b8"} and set(data["decode"]) == {"b1", "b32"}
    for row in list(data["prefill"].values()) + list(data["decode"].values()):
        assert row["dense"]["eager"]["median_ms"] > 0 and row["sparse"]["eager"]["median_ms"] > 0
        assert "best" in row["speedup"] and row["pass"] in (True, False)
    # the StaticCache step path (what the GPU captures in a CUDA graph) decodes the same tokens as the HF loop
    assert data["decode"]["b1"]["dense"]["static_eager_tokens_match_eager"]["equal_fraction"] == 1.0
    assert data["accuracy"]["logits"]["mode_sparse"]["rel_error"] == 0.0  # nothing converted on the CPU
    assert set(data["targets"]) >= {"prefill_pass", "decode_pass", "prefill_min_speedup", "decode_min_speedup"}


# ---------------------------------------------------------------- the package's structure

def _accelerate_imports() -> dict[str, set[str]]:
    """For each module of llmprune/accelerate, the package's modules it imports ("__init__": the package itself)."""
    pkg = ROOT / "llmprune" / "accelerate"
    mods = {p.stem for p in pkg.glob("*.py")}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((pkg / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import y
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[:2] == ["llmprune", "accelerate"]:
                    deps.add(parts[2] if len(parts) > 2 else "__init__")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[:2] == ["llmprune", "accelerate"]:
                        deps.add(parts[2] if len(parts) > 2 else "__init__")
        graph[m] = {d if d in mods else "__init__" for d in deps} - {m}
    return graph


def test_accelerate_modules_import_one_way():
    graph = _accelerate_imports()
    assert all("__init__" not in deps for m, deps in graph.items() if m != "__init__"), graph  # never the package
    assert graph["ops"] == {"backends"} and {"timing", "policy", "layer"} <= graph["convert"]  # the walker sees
    assert graph["__init__"] >= set(graph) - {"__init__"}  # the package re-exports from every module
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle in llmprune.accelerate: {e.args[1]}")
    assert order[0] == "backends" and order[-1] == "__init__"


def test_old_import_path_warns_and_reexports_the_same_objects(monkeypatch):
    monkeypatch.delitem(sys.modules, "llmprune.export.sparse24", raising=False)
    with pytest.warns(DeprecationWarning, match="llmprune.accelerate"):
        old = importlib.import_module("llmprune.export.sparse24")
    assert set(old.__all__) == set(s24.__all__) | {"NEVER", "VERIFY_TOKENS"}
    for name in s24.__all__:
        assert getattr(old, name) is getattr(s24, name), name
    assert old.NEVER == s24.layer.NEVER and old.VERIFY_TOKENS == s24.convert.VERIFY_TOKENS


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_sparse_linear_matches_dense(backend):
    cap = torch.cuda.get_device_capability()
    if backend == "cutlass" and cap[0] != 8:
        pytest.skip(f"PyTorch's CUTLASS semi-structured kernels need compute capability 8.x, this GPU is {cap[0]}.{cap[1]}")
    ok, why = s24.available_backends(torch.device("cuda"))
    if backend not in ok:
        pytest.skip(why.get(backend, "unavailable"))
    torch.manual_seed(0)
    lin = nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        apply_mask_(lin.weight, nm_mask(lin.weight.abs(), 2, 4))
    mod = s24.Sparse24Linear.from_linear(lin, backend)
    for shape in [(1, 256), (3, 5, 256), (2048, 256)]:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        y, ref = mod(x), lin(x)
        assert y.shape == ref.shape
        assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    back = mod.to_linear()  # no dense copy kept: decompressed through the kernel, exactly
    assert torch.equal(back.weight, lin.weight)


@pytest.mark.gpu
@cuda
def test_gpu_accelerate_tiny_model_always_policy():
    model = mask_2of4_(tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                  num_key_value_heads=2)).to("cuda", torch.bfloat16)
    ids = calib_tokens(n=2, seqlen=16).cuda()
    ref = model(ids).logits.float()
    dense = copy.deepcopy(model)
    rep = s24.accelerate_2of4_(model, policy="always")
    if rep["status"] == "fallback":
        pytest.skip(rep["reason"])
    assert rep["layers"]["replaced"] == 14
    out = model(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()) < 2e-2
    s24.restore_dense_(model)
    for a, b in zip(model.parameters(), dense.parameters()):
        assert torch.equal(a, b)
