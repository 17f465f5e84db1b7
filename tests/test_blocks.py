"""Block pruning: scorers against direct full-model computations, the cached skip-one plumbing, selection,
removal that saves/reloads/generates on every tiny family, and the errors a user can act on."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmprune.blocks import (BLOCK_SCORERS, BlockPruneConfig, lowest_blocks, plot_block_scores, prune_blocks,
                             remove_blocks, score_blocks, select_iteratively)
from llmprune.blocks import states as block_states
from llmprune.blocks.influence import block_influence, token_cosine
from llmprune.blocks.kl import token_kl
from llmprune.errors import LLMPruneError
from llmprune.evaluation.perplexity import perplexity
from llmprune.models import find_blocks

from conftest import FAMILIES, calib_tokens, tiny_model

NUM_BLOCKS = 4


def deep_model(family: str, n: int = NUM_BLOCKS, **overrides):
    """A tiny model of `family` with `n` blocks, ready for quiet greedy generation."""
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    model = tiny_model(family, **{key: n, **overrides})
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = 2
    if gen.pad_token_id is None:
        gen.pad_token_id = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
    return model


def skip_hooks(model, indices):
    """Forward hooks that make blocks `indices` of the dense model return their input unchanged."""

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    blocks = find_blocks(model)
    return [blocks[i].register_forward_hook(skip, with_kwargs=True) for i in indices]


@torch.no_grad()
def logits_skipping(model, tokens, indices):
    handles = skip_hooks(model, indices)
    try:
        return model(input_ids=tokens, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def without_block(model, i):
    """Oracle: a deep copy of `model` with block i deleted from its ModuleList (and the layer count and
    per-layer attention types fixed by hand, as the model's forward reads them)."""
    m = copy.deepcopy(model)
    del find_blocks(m).modules[i]
    cfg = m.config
    cfg.num_hidden_layers = cfg.num_hidden_layers - 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for j, t in enumerate(cfg.layer_types) if j != i]
    return m


# ---------------------------------------------------------------- pure math

def test_block_influence_hand_examples():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    assert block_influence(x, 3 * x) == pytest.approx(0.0, abs=1e-7)  # same direction: no influence
    assert block_influence(x, torch.tensor([[[0.0, 1.0], [0.0, -1.0]]])) == pytest.approx(1.5)  # cos 0 and -1
    assert token_cosine(x.half(), x.half()).dtype == torch.float32


def test_token_kl_hand_example():
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(token_kl(p.log(), q.log())) == pytest.approx(want, rel=1e-6)
    assert float(token_kl(p.log(), p.log() + 3.0)) == pytest.approx(0.0, abs=1e-7)  # logits shift: same distribution


def test_lowest_blocks_ties_protect_nan():
    assert lowest_blocks([3.0, 1.0, 1.0, 0.5], 2) == [1, 3]  # 0.5, then the tie at 1.0 to block 1
    assert lowest_blocks([3.0, 1.0, 1.0, 5.0], 1) == [1]  # tie goes to the lower index
    assert lowest_blocks([0.0, 1.0, 2.0, 0.1], 2, protect=[0, 3]) == [1, 2]
    assert lowest_blocks([float("nan"), 1.0, 2.0], 1) == [1]  # NaN never looks unimportant


def test_iterative_selection_differs_from_one_shot_on_redundant_pair():
    # blocks 1 and 2 are copies of each other: each looks unimportant while the other is there
    def score(kept):
        return [10.0 if (i in (1, 2) and not {1, 2} <= set(kept)) else {0: 5.0, 1: 1.0, 2: 1.0, 3: 3.0}[i]
                for i in kept]

    assert lowest_blocks(score([0, 1, 2, 3]), 2) == [1, 2]
    rounds = select_iteratively(score, lambda pos: None, 4, 2)
    assert [r["removed"] for r in rounds] == [[1], [3]]
    assert rounds[1]["blocks"] == [0, 2, 3] and rounds[1]["scores"] == [5.0, 10.0, 3.0]
    rounds = select_iteratively(score, lambda pos: None, 4, 2, protect=[3])
    assert [r["removed"] for r in rounds] == [[1], [0]]


# ---------------------------------------------------------------- scorers against direct computations

@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_block_influence_matches_hooked_forward(family):
    model, tokens = deep_model(family), calib_tokens()
    seen = {}

    def grab(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x_in, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [b.register_forward_hook(grab(i), with_kwargs=True) for i, b in enumerate(find_blocks(model).modules)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    want = []
    for i in range(NUM_BLOCKS):
        a, b = seen[i][0].double(), seen[i][1].double()
        # a zero state (Gemma's padding embedding of token 0) counts as cosine 0, as in torch's cosine_similarity
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
        want.append(1.0 - float(cos.mean()))
    got = score_blocks(model, "block-influence", tokens, device="cpu", batch_size=3)  # batches of 3 and 1
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tail_is_the_models_own_norm_and_head(family):
    model, tokens = deep_model(family, n=2), calib_tokens()
    cache = block_states.cache_block_states(model, tokens, device=torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        want = model(input_ids=tokens, use_cache=False).logits
    with block_states.model_tail(model, find_blocks(model), torch.device("cpu"), cache.returns_tuple) as tail:
        got = tail(cache.outputs[0], tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert len(find_blocks(model)) == 2 and type(find_blocks(model)[0]).__name__.endswith(("Layer", "Block"))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["block-ppl", "block-kl"])
def test_skip_scores_match_full_forward_without_the_block(family, method):
    model, tokens = deep_model(family), calib_tokens(n=6)
    budget_mb = 96 * 4 * 6 * 5 / 2**20  # block-kl: 5 tokens per chunk, block-ppl: 10 (pieces of 16-token windows)
    got = score_blocks(model, method, tokens, device="cpu", batch_size=4, logits_budget_mb=budget_mb)  # batches of 4, 2
    with torch.no_grad():
        dense = model(input_ids=tokens, use_cache=False).logits
    want = []
    for i in range(NUM_BLOCKS):
        m = without_block(model, i)
        if method == "block-ppl":
            want.append(perplexity(m, tokens.reshape(-1), tokens.shape[1])["ppl"])
        else:
            with torch.no_grad():
                q = m(input_ids=tokens, use_cache=False).logits
            kl = F.kl_div(q.double().log_softmax(-1), dense.double().log_softmax(-1), log_target=True,
                          reduction="none").sum(-1)
            want.append(float(kl.mean()))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_skip_scoring_runs_each_block_once_per_candidate_after_it():
    model, tokens = deep_model("llama", n=5), calib_tokens()
    calls = [0] * 5
    handles = []
    for i, b in enumerate(find_blocks(model).modules):
        handles.append(b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)))
    score_blocks(model, "block-ppl", tokens, device="cpu", batch_size=2)  # 2 batches
    for h in handles:
        h.remove()
    # one sequential pass (1 call per batch), then block j runs for the j candidates i < j; never a prefix rerun
    assert calls == [2 * (1 + j) for j in range(5)]


# ---------------------------------------------------------------- selection on a real model

def test_one_shot_removes_lowest_and_iterative_rescores():
    tokens = calib_tokens()
    model = deep_model("llama", n=5)
    dense_scores = score_blocks(model, "block-ppl", tokens, device="cpu")
    one = copy.deepcopy(model)
    rep = prune_blocks(one, BlockPruneConfig("block-ppl", num_blocks=2, protect=(0, -1), device="cpu"), tokens)
    assert rep["scores"] == pytest.approx(dense_scores)
    assert rep["removed"] == lowest_blocks(dense_scores, 2, [0, 4])
    assert len(find_blocks(one)) == 3 and rep["kept"] == [i for i in range(5) if i not in rep["removed"]]

    it = copy.deepcopy(model)
    rep = prune_blocks(it, BlockPruneConfig("block-ppl", num_blocks=2, protect=(0, -1), iterative=True,
                                            device="cpu"), tokens)
    first = rep["removal_order"][0]
    assert first == lowest_blocks(dense_scores, 1, [0, 4])[0]
    ref = copy.deepcopy(model)
    remove_blocks(ref, [first])
    assert rep["rounds"][1]["blocks"] == [i for i in range(5) if i != first]
    assert rep["rounds"][1]["scores"] == pytest.approx(score_blocks(ref, "block-ppl", tokens, device="cpu"))
    assert rep["params_after"] < rep["params_before"]
    assert rep["flops_per_token_after"] < rep["flops_per_token_before"]
    assert set(rep["timings"]) >= {"scoring", "removal", "total"}


# ---------------------------------------------------------------- removal: smaller model that reloads

REMOVAL_CASES = {family: {} for family in FAMILIES}
REMOVAL_CASES["qwen2"] = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
REMOVAL_CASES["gemma3"] = dict(sliding_window_pattern=2)


@torch.no_grad()
def greedy(model, prompt, use_cache):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, use_cache=use_cache)


@pytest.mark.parametrize("family", sorted(REMOVAL_CASES))
def test_removal_saves_reloads_and_generates(family, tmp_path):
    model, tokens = deep_model(family, **REMOVAL_CASES[family]), calib_tokens(n=2, seqlen=12)
    cfg = model.config
    types_before = list(getattr(cfg, "layer_types", None) or [])
    remove = [1]
    want = logits_skipping(model, tokens, remove)
    params = sum(p.numel() for p in model.parameters())

    rep = remove_blocks(model, remove)
    assert rep["removed"] == [1] and rep["kept"] == [0, 2, 3]
    assert rep["params_before"] == params and rep["params_after"] < params
    assert len(find_blocks(model)) == 3 and cfg.num_hidden_layers == 3
    for j, block in enumerate(find_blocks(model).modules):
        idx = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {j}, f"block {j}: layer_idx {idx}"
    if types_before:
        assert cfg.layer_types == [t for j, t in enumerate(types_before) if j != 1]
        assert rep["config_updates"]["layer_types"]["after"] == cfg.layer_types
    if family == "qwen2":
        assert types_before == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert cfg.max_window_layers == 1
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    rc = again.config
    assert rc.num_hidden_layers == 3 and len(find_blocks(again)) == 3
    if types_before:
        assert list(rc.layer_types) == cfg.layer_types and len(rc.layer_types) == 3
    with torch.no_grad():
        assert torch.allclose(again(input_ids=tokens, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
    prompt = tokens[:1, :6]
    out = greedy(again, prompt, use_cache=True)
    assert out.shape == (1, 14)
    assert torch.equal(out, greedy(again, prompt, use_cache=False))
    assert torch.equal(greedy(model, prompt, use_cache=True), out)  # the in-memory model's cache works too


def test_removal_of_several_blocks_with_negative_index_and_gpt2_n_layer():
    model, tokens = deep_model("gpt2", n=5), calib_tokens(n=2)
    want = logits_skipping(model, tokens, [0, 2, 4])
    rep = remove_blocks(model, [0, 2, -1])
    assert rep["removed"] == [0, 2, 4] and model.config.n_layer == 2
    assert rep["config_updates"] == {"n_layer": {"before": 5, "after": 2}}
    with torch.no_grad():
        assert torch.allclose(model(input_ids=tokens).logits, want, atol=1e-5, rtol=1e-5)


def test_moe_index_list_is_renumbered(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 3], decoder_sparse_step=1)
    model = T.Qwen3MoeForCausalLM(cfg).eval()
    tokens = calib_tokens(n=2)
    want = logits_skipping(model, tokens, [1])
    rep = remove_blocks(model, [1])
    assert model.config.mlp_only_layers == [0, 2] and rep["config_updates"]["mlp_only_layers"]["after"] == [0, 2]
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=tokens).logits, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors and configs

def test_config_validation():
    with pytest.raises(LLMPruneError, match=r"unknown block-pruning method 'block-infuence' \(did you mean 'block-influence'\?\); known: block-influence, block-kl, block-ppl"):
        BlockPruneConfig("block-infuence", num_blocks=1)
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(LLMPruneError, match="ratio must lie strictly between 0 and 1"):
            BlockPruneConfig("block-kl", ratio=bad)
    with pytest.raises(LLMPruneError, match="exactly one of num_blocks and ratio"):
        BlockPruneConfig("block-kl")
    with pytest.raises(LLMPruneError, match="exactly one of num_blocks and ratio"):
        BlockPruneConfig("block-kl", num_blocks=1, ratio=0.5)
    with pytest.raises(LLMPruneError, match="num_blocks must be an integer >= 1"):
        BlockPruneConfig("block-kl", num_blocks=0)
    c = BlockPruneConfig("block-ppl", ratio=0.5, protect=[0, -1], iterative=True)
    assert c.protect == (0, -1) and c.blocks_to_remove(4) == 2 and c.blocks_to_remove(5) == 3
    assert BlockPruneConfig.from_dict(c.to_dict()) == c
    with pytest.raises(LLMPruneError, match="unknown BlockPruneConfig key"):
        BlockPruneConfig.from_dict({"method": "block-kl", "num_blocks": 1, "blocks": 2})
    assert BLOCK_SCORERS.names() == ["block-influence", "block-kl", "block-ppl"]


def test_bad_inputs_are_refused_before_any_change():
    tokens = calib_tokens()
    model = deep_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    cases = [
        (BlockPruneConfig("block-influence", num_blocks=4), "cannot remove 4 of 4 blocks: at least one must stay"),
        (BlockPruneConfig("block-influence", num_blocks=3, protect=(0, -1)),
         r"only 2 of 4 are not protected \(\[0, 3\]\)"),
        (BlockPruneConfig("block-influence", ratio=0.1), "rounds to 0 blocks"),
        (BlockPruneConfig("block-influence", num_blocks=1, protect=(4,)), "protected block index 4 is out of range"),
    ]
    for config, message in cases:
        with pytest.raises(LLMPruneError, match=message):
            prune_blocks(model, config, tokens)
    with pytest.raises(LLMPruneError, match=r"token ids must lie in \[0, 96\)"):
        prune_blocks(model, BlockPruneConfig("block-kl", num_blocks=1), tokens + 96)
    with pytest.raises(LLMPruneError, match="block index 7 is out of range"):
        remove_blocks(model, [7])
    with pytest.raises(LLMPruneError, match="unknown block-pruning method"):
        score_blocks(model, "shortgpt", tokens)
    assert len(find_blocks(model)) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_models_whose_blocks_cannot_be_removed():
    gpt2 = deep_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(LLMPruneError, match="scale_attn_by_inverse_layer_idx"):
        prune_blocks(gpt2, BlockPruneConfig("block-influence", num_blocks=1), calib_tokens())
    odd = deep_model("llama")
    odd.config.num_hidden_layers = 7  # no list of 7 blocks
    with pytest.raises(LLMPruneError, match="no list of 7 Transformer blocks"):
        remove_blocks(odd, [1])

    import transformers as T

    torch.manual_seed(0)  # MoE every 2nd block, derived from the index: removing block 0 would shift it
    cfg = T.Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)
    moe = T.Qwen2MoeForCausalLM(cfg).eval()
    with pytest.raises(LLMPruneError, match="would not reload as saved"):
        remove_blocks(moe, [0])
    assert len(find_blocks(moe)) == 4 and moe.config.num_hidden_layers == 4
    remove_blocks(moe, [0, 1])  # a whole period: the pattern survives


def test_plot_block_scores(tmp_path):
    pytest.importorskip("matplotlib")
    model = deep_model("llama")
    rep = prune_blocks(model, BlockPruneConfig("block-influence", num_blocks=2, iterative=True, protect=(0,),
                                               device="cpu"), calib_tokens())
    out = plot_block_scores(rep, tmp_path / "plots" / "bi.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
