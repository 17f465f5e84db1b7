"""The calibration engine: block-input capture per block, sequential propagation, determinism."""

import copy

import pytest
import torch

import llmprune
from llmprune.calibration import observe, run_sequential
from llmprune.config import PruneConfig
from llmprune.models import find_blocks, linear_layers
from llmprune.scorers import SCORERS, register_scorer
from llmprune.scorers.wanda import Wanda

from conftest import FAMILIES, calib_tokens, tiny_model


def _block_outputs(model, tokens):
    """Each block's output in the model's own full forward (forward hooks)."""
    blocks = find_blocks(model)
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, k, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o),
                                     with_kwargs=True) for i, b in enumerate(blocks.modules)]
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_by_block_run_reproduces_the_full_forward(family):
    """Captured args/kwargs (masks, rotary, per-layer sliding windows) let blocks run alone exactly as in the model."""
    model = tiny_model(family)
    tokens = calib_tokens(n=3)
    ref = _block_outputs(model, tokens)
    seen = {}

    def process(ctx):
        seen[ctx.index] = torch.cat(ctx.forward(keep_outputs=True))

    run_sequential(model, tokens, process, device=torch.device("cpu"), batch_size=2, propagate_last=True)
    assert sorted(seen) == list(range(len(ref)))
    for i in ref:
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-5, atol=1e-5)


def test_block_i_is_calibrated_on_outputs_of_already_pruned_blocks():
    """Block 1's statistics equal those of the *pruned* model's block-1 inputs, not the dense model's."""
    model = tiny_model("llama", num_hidden_layers=3)
    dense = copy.deepcopy(model)
    tokens = calib_tokens(n=4)
    llmprune.prune(model, PruneConfig(method="wanda", sparsity=0.5), tokens)

    # recompute the q_proj input statistic of every block from each model's own full forward
    def q_input_sqnorm(m):
        got = {}
        blocks = find_blocks(m)
        hooks = []
        for i, b in enumerate(blocks.modules):
            q = b.self_attn.q_proj
            hooks.append(q.register_forward_pre_hook(
                lambda mod, a, i=i: got.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).square().sum(0))))
        with torch.no_grad():
            m(input_ids=tokens, use_cache=False)
        for h in hooks:
            h.remove()
        return got

    pruned_stats, dense_stats = q_input_sqnorm(model), q_input_sqnorm(dense)

    # prune the dense copy again through prune() itself, with a Wanda that records the statistics it is given
    recorded = []

    @register_scorer("_recording_wanda")
    class RecordingWanda(Wanda):
        def prune(self, weight, stats, pattern, group):
            recorded.append(stats.sqnorm.clone())
            return super().prune(weight, stats, pattern, group)

    try:
        llmprune.prune(dense, PruneConfig(method="_recording_wanda", sparsity=0.5), tokens)
    finally:
        SCORERS.unregister("_recording_wanda")
    per_block = len(linear_layers(find_blocks(dense).modules[0]))
    recorded = {i: recorded[i * per_block] for i in range(3)}  # q_proj comes first in each block
    torch.testing.assert_close(recorded[0], dense_stats[0])  # block 0 sees the embeddings either way
    for i in (1, 2):
        torch.testing.assert_close(recorded[i], pruned_stats[i], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(recorded[i], dense_stats[i], rtol=1e-3), "block saw dense outputs"


def test_observe_shares_stats_of_layers_reading_the_same_input_and_removes_hooks():
    model = tiny_model("llama")
    block = find_blocks(model).modules[0]
    layers = linear_layers(block)
    tokens = calib_tokens(n=2)

    def process(ctx):
        if ctx.index:
            return
        with observe(ctx.block, layers, "hessian") as stats:
            ctx.forward()
        assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
        assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
        assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
        assert stats["self_attn.q_proj"].ntokens == 2 * 16
        process.stats = stats

    run_sequential(model, tokens, process, device=torch.device("cpu"), batch_size=1)
    assert all(not m._forward_pre_hooks for m in layers.values())
    assert not block._forward_pre_hooks
    h = process.stats["mlp.down_proj"].hessian
    torch.testing.assert_close(h, h.t())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria"])
def test_same_inputs_and_seed_give_identical_masks(method):
    tokens = calib_tokens()
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    llmprune.prune(a, PruneConfig(method=method, sparsity=0.5), tokens)
    llmprune.prune(b, PruneConfig(method=method, sparsity=0.5), tokens)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa == 0, pb == 0), na
        assert torch.equal(pa, pb), na


def test_batch_size_does_not_change_the_result():
    tokens = calib_tokens(n=4)
    a, b = tiny_model("llama"), tiny_model("llama")
    llmprune.prune(a, PruneConfig(method="wanda", batch_size=1), tokens)
    llmprune.prune(b, PruneConfig(method="wanda", batch_size=4), tokens)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa == 0, pb == 0)


def test_nan_in_activations_is_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        find_blocks(model).modules[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(llmprune.LLMPruneError, match="NaN or Inf in the activations after block 0"):
        llmprune.prune(model, PruneConfig(method="wanda"), calib_tokens())


def test_out_of_vocabulary_tokens_are_refused():
    with pytest.raises(llmprune.LLMPruneError, match="token ids must lie in"):
        llmprune.prune(tiny_model("llama"), PruneConfig(method="wanda"), torch.full((2, 8), 10_000))


def test_unsupported_architecture_is_a_clear_error():
    class NotATransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "get_text_config": lambda self: self})()
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(llmprune.LLMPruneError, match="not supported"):
        llmprune.prune(NotATransformer(), PruneConfig(method="magnitude"))


def test_calibration_longer_than_the_model_context_is_refused():
    model = tiny_model("gpt2")  # n_positions = 64
    with pytest.raises(llmprune.LLMPruneError, match="exceeds the model's max_position_embeddings 64"):
        llmprune.prune(model, PruneConfig(method="wanda"), calib_tokens(n=2, seqlen=128))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_statistics_pass_stops_after_the_last_linear_layer_with_the_same_statistics(family):
    model = tiny_model(family)
    block = find_blocks(model).modules[0]
    layers = linear_layers(block)
    tokens = calib_tokens(n=4)
    seen = {}

    def process(ctx):
        if ctx.index:
            return
        outs = []
        handle = ctx.block.register_forward_hook(lambda m, a, o: outs.append(1))
        try:
            for stop in (False, True):
                outs.clear()
                with observe(ctx.block, layers, "sqnorm", stop_early=stop) as stats:
                    ctx.forward()
                seen[stop] = ({k: v.sqnorm.clone() for k, v in stats.items()}, len(outs),
                              {k: v.ntokens for k, v in stats.items()})
        finally:
            handle.remove()

    run_sequential(model, tokens, process, device=torch.device("cpu"), batch_size=1)
    full, cut = seen[False], seen[True]
    assert full[1] == 4 and cut[1] == 1  # only the first forward (which learns the order) ran to the end
    assert full[2] == cut[2]  # every layer saw all 4 batches
    for name in full[0]:
        torch.testing.assert_close(cut[0][name], full[0][name], rtol=0, atol=0)


def test_propagation_in_place_gives_the_same_outputs_as_a_new_list():
    model = tiny_model("llama")
    tokens = calib_tokens(n=3)
    got = {}

    def process(ctx):
        if ctx.index == 0:
            got["new"] = ctx.forward(keep_outputs=True)
            got["ins"] = list(ctx.inputs)
            got["same"] = ctx.forward(keep_outputs=True, in_place=True)
            got["list_is_inputs"] = got["same"] is ctx.inputs

    run_sequential(model, tokens, process, device=torch.device("cpu"), batch_size=1)
    assert got["list_is_inputs"]
    for a, b, x in zip(got["new"], got["same"], got["ins"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, x)


def test_on_device_reads_an_indexless_device_as_the_current_one():
    from llmprune.calibration.placement import on_device

    t = torch.zeros(1)
    assert on_device(t, torch.device("cpu")) and not on_device(t, torch.device("meta"))
    assert not on_device(torch.zeros(1, device="meta"), torch.device("cpu"))
