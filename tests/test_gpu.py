"""GPU paths (skipped where CUDA is absent, as in CI; run on the device with `pytest -m gpu`)."""

import copy

import pytest
import torch

import llmprune
from llmprune.config import PruneConfig
from llmprune.evaluation.perplexity import perplexity
from llmprune.models import find_blocks

from conftest import calib_tokens, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpu_pruning_keeps_blocks_in_host_memory_and_matches_cpu(method, pattern):
    model = tiny_model("llama", num_hidden_layers=3).double().float()
    ref = copy.deepcopy(model)
    tokens = calib_tokens(n=8, seqlen=32)
    host_ptrs = [p.data_ptr() for p in model.parameters()]
    cfg = dict(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None)
    rep = llmprune.prune(model, PruneConfig(device="cuda", **cfg), tokens)
    llmprune.prune(ref, PruneConfig(device="cpu", **cfg), tokens)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == host_ptrs  # results copied back into the same storage
    assert find_blocks(model).modules[0].mlp.up_proj.weight.device.type == "cpu"
    assert rep.peak_memory["gpu_max_allocated"] > 0
    agree = sum(int(((a == 0) == (b == 0)).sum()) for a, b in zip(model.parameters(), ref.parameters()))
    total = sum(p.numel() for p in model.parameters())
    assert agree / total > 0.99  # float arithmetic differs slightly between devices


def test_gpu_perplexity_matches_cpu_and_compiled():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (32 * 6,), generator=torch.Generator().manual_seed(0))
    cpu = perplexity(model, ids, 32, batch_size=4)
    gpu = perplexity(model, ids, 32, batch_size=4, device="cuda")
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)
    assert next(model.parameters()).device.type == "cpu"
    model.cuda()
    comp = perplexity(model, ids, 32, batch_size=4, compile=True)
    assert comp["ppl"] == pytest.approx(cpu["ppl"], rel=1e-3)


def test_gpu_half_precision_hessian_is_exact_and_graphed_sparsegpt_equals_eager():
    from llmprune.calibration.observe import add_to_stats
    from llmprune.config import Pattern
    from llmprune.scorers.base import LayerStats
    from llmprune.scorers.sparsegpt import sparsegpt_inverse_hessian, sparsegpt_prune

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 3000, 256, device="cuda", generator=g).bfloat16()
    st = LayerStats()
    add_to_stats(st, x, "hessian")
    ref = x.reshape(-1, 256).double().t() @ x.reshape(-1, 256).double()
    assert st.hessian.dtype == torch.float32
    assert float((st.hessian.double() - ref).norm() / ref.norm()) < 2e-5  # float32 accumulation (a bf16 result: ~4e-3)
    hinv, dead = sparsegpt_inverse_hessian(st.hessian)
    w = torch.randn(384, 256, device="cuda", generator=g)
    for pattern in (Pattern.parse("unstructured", 0.5), Pattern.parse("2:4", None)):
        graphs = {}
        a = sparsegpt_prune(w, hinv, dead, pattern, "per-layer", 128, graphs, use_triton=False)
        b = sparsegpt_prune(w, hinv, dead, pattern, "per-layer", 128, None, use_triton=False)
        assert graphs and all(v is not None for v in graphs.values())  # the graph path really ran
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-5)


def test_gpu_shuttle_prefetch_gives_the_same_model_as_synchronous_moves():
    model = tiny_model("llama", num_hidden_layers=4)
    ref = copy.deepcopy(model)
    tokens = calib_tokens(n=8, seqlen=32)
    cfg = dict(method="wanda", sparsity=0.5, device="cuda")
    llmprune.prune(model, PruneConfig(**cfg), tokens)
    from llmprune.calibration import runner

    orig = runner.BlockShuttle

    class Sync(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "prefetch": False})

    runner.BlockShuttle = Sync
    try:
        llmprune.prune(ref, PruneConfig(**cfg), tokens)
    finally:
        runner.BlockShuttle = orig
    for a, b in zip(model.parameters(), ref.parameters()):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("pattern,group", [("unstructured", "per-layer"), ("unstructured", "per-row"), ("2:4", "per-layer"),
                                           ("4:8", "per-layer")])
def test_gpu_triton_column_loop_equals_the_eager_loop(pattern, group):
    from llmprune.config import Pattern
    from llmprune.scorers import sparsegpt_triton
    from llmprune.scorers.sparsegpt import sparsegpt_inverse_hessian, sparsegpt_prune

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2000, 384, device="cuda", generator=g)
    hinv, dead = sparsegpt_inverse_hessian(x.t() @ x)
    w = torch.randn(200, 384, device="cuda", generator=g)  # 200 rows: not a multiple of the rows per program
    pat = Pattern.parse(pattern, 0.5 if pattern == "unstructured" else None)
    nm = (pat.n, pat.m) if pat.kind == "nm" else None
    assert sparsegpt_triton.available(w, 128, nm) == (pattern != "4:8")  # 4:8 keeps the CUDA-graph loop
    a = sparsegpt_prune(w, hinv, dead, pat, group, 128, {}, use_triton=True)
    b = sparsegpt_prune(w, hinv, dead, pat, group, 128, None, use_triton=False)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert float(a.mask.float().mean()) == pytest.approx(0.5)


def test_gpu_blocks_already_on_the_gpu_are_pruned_where_they_are():
    model = tiny_model("llama", num_hidden_layers=2).cuda()
    ptrs = [p.data_ptr() for p in model.parameters()]
    llmprune.prune(model, PruneConfig(method="wanda", sparsity=0.5, device="cuda"), calib_tokens(n=4, seqlen=32))
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # no copy through host memory and back
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("method,whole_model", [("wanda", 0.999), ("ria", 0.999), ("sparsegpt", 0.98)])
def test_gpu_compiled_calibration_masks_agree_with_eager(method, whole_model):
    """Issue 12: the compiled statistics pass sums in another order than the eager one. On one block (the same
    inputs) the masks agree on at least 99.99 % of the weights (bf16, a Llama block shape scaled down). Over
    three blocks the compiled propagation's bf16 rounding also moves the next blocks' inputs, so agreement is
    lower (measured on an H200: wanda 99.93 %, ria 99.985 %, sparsegpt 98.7 %): bounded here, reported in the
    benchmark notes."""
    import transformers as T

    for layers, bound in ((1, 0.9999), (3, whole_model)):
        cfg = T.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
        torch.manual_seed(0)
        base = T.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        tokens = calib_tokens(n=16, seqlen=128, vocab_size=512)
        models = {}
        for mode in ("off", "on"):
            m = copy.deepcopy(base)
            rep = llmprune.prune(m, PruneConfig(method=method, sparsity=0.5, device="cuda", compile=mode), tokens)
            assert rep.compiled == (mode == "on")
            models[mode] = m
        pairs = [(a, b) for (n, a), b in zip(models["off"].named_parameters(), models["on"].parameters())
                 if "layers" in n and a.dim() == 2]
        agree = sum(int(((a == 0) == (b == 0)).sum()) for a, b in pairs)
        total = sum(a.numel() for a, _ in pairs)
        assert agree / total >= bound, f"{method}, {layers} blocks: {agree / total:.6f} of the weights agree"


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_gpu_nm_ranking_equals_the_cpu_topk_mask(nm):
    from llmprune.masks import nm_mask

    torch.manual_seed(0)
    scores = torch.randn(256, 512)  # continuous: no ties, one right answer
    assert torch.equal(nm_mask(scores.cuda(), *nm).cpu(), nm_mask(scores, *nm))
