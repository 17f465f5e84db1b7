"""The tiny-model matrix: every method x pattern x family prunes, hits its sparsity, leaves the head alone."""

import pytest
import torch

import llmprune
from llmprune.config import PruneConfig
from llmprune.masks import check_nm
from llmprune.models import find_blocks, linear_layers, weight_oi

from conftest import FAMILIES, calib_tokens, tiny_model

METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]
PATTERNS = ["unstructured", "2:4", "4:8"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_matrix(family, method, pattern):
    model = tiny_model(family)
    tokens = calib_tokens()
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    outside = {n: p.detach().clone() for n, p in model.named_parameters() if ".weight" not in n or "norm" in n}
    report = llmprune.prune(model, PruneConfig(method=method, pattern=pattern, sparsity=0.5 if pattern == "unstructured" else None), tokens)

    blocks = find_blocks(model)
    for i, block in enumerate(blocks.modules):
        layers = linear_layers(block)
        assert layers
        for name, layer in layers.items():
            w = weight_oi(layer)
            frac = float((w == 0).float().mean())
            if pattern == "unstructured":
                assert frac == 0.5, f"{name}: {frac}"  # exact count in every comparison group
            else:
                n, m = map(int, pattern.split(":"))
                assert check_nm(w, n, m), f"{name} violates {pattern}"
            assert not torch.signbit(w[w == 0]).any(), "-0.0 written"
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    for n, p in model.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), f"{n} changed"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens).logits).all()


def test_gpt2_conv1d_layers_are_pruned_along_their_input_dimension():
    model = tiny_model("gpt2")
    llmprune.prune(model, PruneConfig(method="wanda", pattern="2:4"), calib_tokens())
    c_fc = find_blocks(model).modules[0].mlp.c_fc  # Conv1D: weight (in=32, out=128)
    assert c_fc.weight.shape == (32, 128)
    assert check_nm(c_fc.weight.t(), 2, 4)
    assert not check_nm(c_fc.weight, 2, 4)  # groups must run along the input dimension


def test_nm_width_not_divisible_is_refused_before_any_change():
    model = tiny_model("llama", intermediate_size=60)  # down_proj input 60 % 8 != 0
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(llmprune.LLMPruneError, match="60 of .*down_proj is not divisible by M=8"):
        llmprune.prune(model, PruneConfig(method="magnitude", pattern="4:8"), calib_tokens())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_wanda_per_row_exact_and_magnitude_per_layer_uneven():
    tokens = calib_tokens()
    m1 = tiny_model("llama")
    llmprune.prune(m1, PruneConfig(method="wanda", sparsity=0.5), tokens)
    q = find_blocks(m1).modules[0].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()  # every row exactly half
    m2 = tiny_model("llama")
    llmprune.prune(m2, PruneConfig(method="magnitude", sparsity=0.5), tokens)
    q = find_blocks(m2).modules[0].self_attn.q_proj.weight
    assert (q == 0).sum() == q.numel() // 2
    assert len(set((q == 0).sum(1).tolist())) > 1  # rows compete with each other
