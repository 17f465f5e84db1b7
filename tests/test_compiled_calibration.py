"""The compiled calibration passes (llmprune.calibration.compiled) against the eager ones, on the CPU (inductor's
C++ backend): the same masks, every registered kind of collector (in the graph, and eager on kept inputs), one
graph per pass serving every block, hooks removed afterwards."""

import copy
import shutil

import pytest
import torch

import llmprune
from llmprune.calibration.compiled import observe_compiled
from llmprune.calibration.observe import observe
from llmprune.config import PruneConfig
from llmprune.models.arch import find_blocks, linear_layers

from conftest import calib_tokens, tiny_model

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="torch.compile on the CPU needs a C compiler")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_compiled_calibration_gives_the_eager_masks_with_one_graph_per_pass(method):
    import torch._dynamo as dynamo

    base = tiny_model("llama", num_hidden_layers=3)
    tokens = calib_tokens(n=4, seqlen=16)
    eager, comp = copy.deepcopy(base), copy.deepcopy(base)
    llmprune.prune(eager, PruneConfig(method=method, sparsity=0.5, device="cpu", compile="off"), tokens)
    dynamo.reset()
    dynamo.utils.counters.clear()
    rep = llmprune.prune(comp, PruneConfig(method=method, sparsity=0.5, device="cpu", compile="on"), tokens)
    assert rep.compiled
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2  # statistics pass, propagation: all 3 blocks
    for (n, a), b in zip(eager.named_parameters(), comp.parameters()):
        assert torch.equal(a == 0, b == 0), n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for m in linear_layers(find_blocks(comp).modules[0]).values():
        assert not m._forward_pre_hooks and not hasattr(m, "_llmprune_keep")


def test_compiled_statistics_equal_eager_hooks_for_both_collector_kinds():
    from llmprune.calibration.runner import run_sequential

    model = tiny_model("llama", num_hidden_layers=2)
    got = {}

    def process(ctx):
        layers = linear_layers(ctx.block)
        with observe(ctx.block, layers, ("sqnorm", "hessian")) as ref:
            ctx.forward()
        with observe_compiled(ctx.block, layers, ("sqnorm", "hessian"), ctx.calls, ctx.inputs) as (st, run):
            for b in range(len(ctx.inputs)):
                run(b, ctx.device)
        got[ctx.index] = (ref, st)

    run_sequential(model, calib_tokens(n=4, seqlen=16), process, device=torch.device("cpu"), batch_size=2)
    for ref, st in got.values():
        for name in ref:
            assert st[name].ntokens == ref[name].ntokens == 64 and st[name].nsamples == 4
            for stat in ("sqnorm", "hessian"):
                torch.testing.assert_close(st[name][stat], ref[name][stat], rtol=1e-5, atol=1e-5)
        qkv = [st[n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
        assert qkv[0] is qkv[1] is qkv[2]  # one input, one LayerStats (SparseGPT factors it once), as eager


def test_compile_option_is_validated():
    with pytest.raises(llmprune.LLMPruneError, match="compile must be auto, on or off"):
        PruneConfig(method="wanda", sparsity=0.5, compile="yes")
