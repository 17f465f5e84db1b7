"""`selection`: exact-k (the default) against the reference code's rule, on hand-made ties and against plain
re-statements of that rule (sort, index, compare) through `llmprune.prune` on a tiny model."""

import pytest
import torch

import llmprune
from llmprune.config import CalibrationConfig, Pattern, PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.masks import (at_or_below_kth, first_k_of_stable_sort, nm_mask, reference_nm_mask,
                            reference_unstructured_mask, select_mask, selection_rule, unstructured_mask)
from llmprune.models import find_blocks, linear_layers, weight_oi
from llmprune.scorers import base as base_mod
from llmprune.scorers import sparsegpt as sg_mod
from llmprune.scorers.sparsegpt import sparsegpt_inverse_hessian, sparsegpt_prune

from conftest import calib_tokens, tiny_model

UNSTRUCTURED = Pattern.parse("unstructured", 0.25)


# ---------------------------------------------------------------- the rules, restated plainly


def restated_threshold(scores, sparsity):
    """Per layer (magnitude, RIA; SparseGPT per lazy block): the value at index int(numel * s) of the ascending
    sort, and every score at or below it."""
    thresh = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
    return scores <= thresh


def restated_stable_rows(scores, sparsity):
    """Per row (Wanda): the first int(in * s) indices of each row's stable ascending sort."""
    idx = torch.sort(scores, dim=-1, stable=True)[1][:, : int(scores.shape[1] * sparsity)]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def restated_nm(scores, n, m):
    """N:M: every M columns, torch.topk(largest=False) of the M-N lowest of each row's slice."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for c in range(0, scores.shape[1], m):
        mask.scatter_(1, c + torch.topk(scores[:, c : c + m].float(), m - n, dim=1, largest=False)[1], True)
    return mask


def few_levels(shape, levels=4, seed=0):
    """Scores with many ties: integers 0..levels-1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float()


# ---------------------------------------------------------------- hand-made oracles


def test_threshold_prunes_k_plus_one_and_every_tie_where_exact_prunes_k():
    s = torch.tensor([[0.5, 1.0, 1.0, 1.0],
                      [2.0, 1.0, 3.0, 4.0]])
    # k = int(8 x 0.25) = 2; sorted 0.5 1 1 1 1 2 3 4: index 2 holds 1, so 0.5 and all four 1s go
    ref = select_mask(s, UNSTRUCTURED, "per-layer", "reference")
    assert torch.equal(ref, torch.tensor([[True, True, True, True], [False, True, False, False]]))
    exact = select_mask(s, UNSTRUCTURED, "per-layer")
    assert exact.sum() == 2 and exact[0, 0] and torch.equal(exact, unstructured_mask(s, 0.25, "per-layer"))
    # no ties at the threshold: k+1 weights (the value at index k is pruned too)
    d = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(select_mask(d, UNSTRUCTURED, "per-layer", "reference").flatten(),
                       torch.tensor([True, True, True] + [False] * 5))


def test_stable_sort_per_row_prunes_the_lower_index_among_ties():
    s = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                      [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    ref = select_mask(s, Pattern.parse("unstructured", 0.5), "per-row", "reference")
    # k = 3: both zeros, then the first 1 (index 0); a row of equal scores loses its first three
    assert torch.equal(ref, torch.tensor([[True, True, False, False, True, False],
                                          [True, True, True, False, False, False]]))
    assert (select_mask(s, Pattern.parse("unstructured", 0.5), "per-row").sum(1) == 3).all()  # exact: k too


def test_exact_per_row_is_not_the_stable_sort_choice_on_ties_so_reference_needs_its_own_rule():
    s = few_levels((16, 64))
    ref = reference_unstructured_mask(s, 0.5, "per-row")
    assert torch.equal(ref, restated_stable_rows(s, 0.5))
    assert not torch.equal(unstructured_mask(s, 0.5, "per-row"), ref)  # CPU topk picks other tied weights
    assert torch.equal(first_k_of_stable_sort(s, 5, 1), torch.sort(s, dim=1, stable=True).indices[:, :5])


def test_sparsity_zero_prunes_nothing_and_a_zero_k_still_prunes_the_minimum():
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0]])
    for group in ("per-layer", "per-row"):
        assert not reference_unstructured_mask(s, 0.0, group).any()  # the references do not prune at 0
    # int(4 x 0.1) = 0 > but sparsity > 0: the value at index 0 (the minimum) and its ties, as the references do
    assert torch.equal(reference_unstructured_mask(s, 0.1, "per-layer"), torch.tensor([[False, True, True, False]]))


def test_n_m_reference_is_topk_and_equals_exact_k():
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 4)]:
        s = few_levels((24, 64), levels=3, seed=n + m)
        ref = select_mask(s, Pattern.parse(f"{n}:{m}", None), "per-row", "reference")
        assert torch.equal(ref, restated_nm(s, n, m)) and torch.equal(ref, reference_nm_mask(s, n, m))
        assert torch.equal(ref, nm_mask(s, n, m))  # exactly M-N per group, same topk choice on this device
        assert (ref.reshape(24, -1, m).sum(-1) == m - n).all()


@pytest.mark.parametrize("seed", range(4))
def test_reference_rules_equal_their_plain_restatements_on_tied_random_scores(seed):
    for shape, levels in [((32, 48), 3), ((7, 130), 5), ((64, 64), 2)]:
        s = few_levels(shape, levels, seed)
        for sp in (0.1, 0.3, 0.5, 0.77):
            assert torch.equal(reference_unstructured_mask(s, sp, "per-layer"), restated_threshold(s, sp))
            assert torch.equal(reference_unstructured_mask(s, sp, "per-row"), restated_stable_rows(s, sp))
            k = int(s.numel() * sp)
            assert torch.equal(at_or_below_kth(s, k), s <= torch.sort(s.flatten()).values[k])


def test_selection_is_validated_named_and_defaults_to_exact():
    assert PruneConfig().selection == "exact" and PruneConfig().to_dict()["selection"] == "exact"
    assert PruneConfig.from_dict({"method": "magnitude", "selection": "reference"}).selection == "reference"
    with pytest.raises(LLMPruneError, match=r"unknown selection 'referenc' \(did you mean 'reference'\?\); known: "
                                            "exact, reference"):
        PruneConfig(selection="referenc")
    with pytest.raises(LLMPruneError, match="unknown selection"):
        select_mask(torch.ones(2, 4), UNSTRUCTURED, "per-row", "bogus")
    rules = {(m, p): PruneConfig(method=m, pattern=p, selection="reference").selection_rule
             for m in ("magnitude", "wanda", "ria", "sparsegpt") for p in ("unstructured", "2:4")}
    assert rules == {("magnitude", "unstructured"): "threshold-le", ("wanda", "unstructured"): "stable-sort-k",
                     ("ria", "unstructured"): "threshold-le", ("sparsegpt", "unstructured"): "threshold-le",
                     **{(m, "2:4"): "topk-k" for m in ("magnitude", "wanda", "ria", "sparsegpt")}}
    assert PruneConfig(method="ria").selection_rule == "exact-k"
    assert selection_rule(UNSTRUCTURED, "per-row", "reference") == "stable-sort-k"


# ---------------------------------------------------------------- SparseGPT's lazy blocks


def test_sparsegpt_reference_threshold_per_lazy_block_by_hand():
    # H = 4 I: every [H^-1]_jj is equal and nothing is updated, so each 4-column block is thresholded on |W|
    W = torch.tensor([[1.0, 1.0, 2.0, 3.0, 0.5, 1.0, 1.0, 1.0],
                      [1.0, 4.0, 1.0, 2.0, 2.0, 2.0, 0.5, 3.0]])
    hinv, dead = sparsegpt_inverse_hessian(4 * torch.eye(8))
    res = sparsegpt_prune(W, hinv, dead, UNSTRUCTURED, "per-layer", blocksize=4, selection="reference")
    # block 1: k = 2, sorted 1 1 1 1 2 2 3 4, index 2 holds 1: the four 1s; block 2: 0.5 0.5 1 1 1 2 2 3: 0.5s, 1s
    expected = torch.tensor([[True, True, False, False, True, True, True, True],
                             [True, False, True, False, False, False, True, False]])
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.weight, W.masked_fill(expected, 0.0))
    exact = sparsegpt_prune(W, hinv, dead, UNSTRUCTURED, "per-layer", blocksize=4)
    assert exact.mask[:, :4].sum() == 2 and exact.mask[:, 4:].sum() == 2


def test_sparsegpt_reference_saliency_is_the_reference_arithmetic_w2_over_d2():
    # find w2, d2 where w2^2 / d2^2 and w2^2 * (1/d2)^2 round differently, and w1 with w1^2 == w2^2 / d2^2
    g = torch.Generator().manual_seed(0)
    while True:
        w2, d2 = torch.rand(2, generator=g) + 0.5
        ref, mul = w2 * w2 / (d2 * d2), (w2 * w2) * ((1 / d2) * (1 / d2))
        w1 = ref.sqrt()
        if ref != mul and w1 * w1 == ref:
            break
    W1 = torch.stack([torch.tensor(0.01), w1, w2, torch.tensor(10.0)]).reshape(1, 4)
    d = torch.stack([torch.tensor(1.0), torch.tensor(1.0), d2, torch.tensor(1.0)])
    # k = int(4 x 0.3) = 1; the reference's saliencies 1e-4, s, s, 100 tie at index 1: three pruned
    mask = sg_mod._reference_lazy_block_mask(W1, d, 0.3, "per-layer")
    assert torch.equal(mask, torch.tensor([[True, True, True, False]]))
    assert restated_threshold(W1 ** 2 / d.reshape(1, -1) ** 2, 0.3).sum() == 3
    assert restated_threshold(W1.square() * d.reciprocal().square(), 0.3).sum() == 2  # the other arithmetic


def test_sparsegpt_reference_n_m_is_topk_of_w2_over_d2_without_updates():
    # a diagonal H with unequal entries: unequal d, no updates; the saliency is the reference's W**2 / d**2
    W = few_levels((12, 16), levels=3, seed=5) - 1.0  # -1, 0, 1: ties everywhere
    h = torch.tensor([1.0, 1.0, 2.0, 2.0] * 4)
    hinv, dead = sparsegpt_inverse_hessian(torch.diag(h))
    d = hinv.diagonal()
    res = sparsegpt_prune(W, hinv, dead, Pattern.parse("2:4", None), blocksize=8, selection="reference")
    expected = restated_nm(W ** 2 / d.reshape(1, -1) ** 2, 2, 4)
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.weight, W.masked_fill(expected, 0.0))


def _quantize_blocks_(model, step=0.02):
    """Round every block linear weight to a multiple of `step` (few levels, many zeros: ties as in a GGUF)."""
    with torch.no_grad():
        for block in find_blocks(model).modules:
            for layer in linear_layers(block).values():
                w = weight_oi(layer)
                w.copy_(torch.round(w / step) * step)


def _layer_weights(model):
    return [weight_oi(layer).detach().clone() for block in find_blocks(model).modules
            for layer in linear_layers(block).values()]


@pytest.mark.parametrize("method,sparsity,restated", [("magnitude", 0.5, restated_threshold),
                                                     ("wanda", 0.2, restated_stable_rows),
                                                     ("ria", 0.2, restated_threshold)])
def test_prune_with_reference_selection_gives_the_restated_reference_mask_of_each_layer(monkeypatch, method,
                                                                                         sparsity, restated):
    model = tiny_model("llama")
    _quantize_blocks_(model)
    before = _layer_weights(model)
    calls = []

    def spy(scores, pattern, group, selection="exact"):
        mask = select_mask(scores, pattern, group, selection)
        calls.append((scores.clone(), selection, mask))
        return mask

    monkeypatch.setattr(base_mod, "select_mask", spy)
    tokens = calib_tokens()
    exact_model = tiny_model("llama")
    _quantize_blocks_(exact_model)
    llmprune.prune(exact_model, PruneConfig(method=method, sparsity=sparsity, device="cpu"), tokens)
    exact_masks = [m for _, _, m in calls]
    calls.clear()
    llmprune.prune(model, PruneConfig(method=method, sparsity=sparsity, device="cpu", selection="reference"), tokens)
    after = _layer_weights(model)
    assert len(calls) == len(before) == 14
    differs = 0
    for (scores, selection, mask), w0, w1, exact in zip(calls, before, after, exact_masks):
        assert selection == "reference"
        assert torch.equal(mask, restated(scores, sparsity))
        assert torch.equal(w1, w0.masked_fill(mask, 0.0))
        if method == "magnitude":
            assert torch.equal(scores, w0.abs())  # the same inputs: the layer's weights as they came
        differs += not torch.equal(mask, exact)
    assert differs > 0  # the ties did matter


def test_prune_magnitude_2_4_reference_is_the_restated_topk(monkeypatch):
    model = tiny_model("llama")
    _quantize_blocks_(model)
    before = _layer_weights(model)
    llmprune.prune(model, PruneConfig(method="magnitude", pattern="2:4", device="cpu", selection="reference"))
    for w0, w1 in zip(before, _layer_weights(model)):
        assert torch.equal(w1, w0.masked_fill(restated_nm(w0.abs(), 2, 4), 0.0))


def test_sparsegpt_reference_lazy_block_masks_inside_the_eager_loop_of_prune(monkeypatch):
    model = tiny_model("llama")
    _quantize_blocks_(model)
    blocks, layers = [], []
    real_block, real_prune = sg_mod._reference_lazy_block_mask, sg_mod.sparsegpt_prune

    def block_spy(W1, d, sparsity, group):
        mask = real_block(W1, d, sparsity, group)
        blocks.append((W1.clone(), d.clone(), sparsity, mask))
        return mask

    def prune_spy(*args, **kwargs):
        res = real_prune(*args, **kwargs)
        layers.append(res.mask)
        return res

    monkeypatch.setattr(sg_mod, "_reference_lazy_block_mask", block_spy)
    monkeypatch.setattr(sg_mod, "sparsegpt_prune", prune_spy)
    cfg = PruneConfig(method="sparsegpt", sparsity=0.2, sparsegpt_blocksize=16, device="cpu", selection="reference")
    llmprune.prune(model, cfg, calib_tokens())
    assert len(layers) == 14
    ties = 0
    for W1, d, sparsity, mask in blocks:
        tmp = W1 ** 2 / d.reshape(1, -1) ** 2  # the reference code's saliency and rule, from the same block
        assert torch.equal(mask, restated_threshold(tmp, sparsity))
        ties += int(mask.sum()) > int(mask.numel() * sparsity) + 1
    assert ties > 0  # blocks where the tied saliencies were all pruned
    i = 0
    for layer_mask in layers:  # each layer's mask is its lazy blocks' masks side by side
        n = layer_mask.shape[1] // 16
        assert torch.equal(layer_mask, torch.cat([b[3] for b in blocks[i : i + n]], dim=1))
        i += n
    assert i == len(blocks)


# ---------------------------------------------------------------- where it is recorded


def test_selection_in_the_record_the_card_and_the_reproduce_command():
    from llmprune.cli import build_prune_parser
    from llmprune.export.card import make_model_card, reproduce_command
    from llmprune.pipeline import _resolved

    assert build_prune_parser().parse_args(["--selection", "reference"]).selection == "reference"
    assert build_prune_parser().parse_args([]).selection == "exact"
    with pytest.raises(LLMPruneError, match="invalid choice"):
        build_prune_parser().parse_args(["--selection", "ties"])
    ref = PruneConfig(method="magnitude", sparsity=0.5, selection="reference")
    assert _resolved(ref, CalibrationConfig(), None, None, None)["selection_rule"] == "threshold-le"

    def record(cfg):
        return {"model": "org/base", "model_kind": "hub", "architecture": "LlamaForCausalLM",
                "config": {"prune": cfg.to_dict(), "calibration": CalibrationConfig().to_dict(), "eval": None,
                           "dtype": "float32"},
                "resolved": _resolved(cfg, CalibrationConfig(), None, None, None),
                "calibration": {"source": "c4", "description": "d", "nsamples": 128, "seqlen": 2048,
                                "token_sha256": "00"},
                "sparsity": 0.5, "perplexity": {}, "evaluation": None}

    assert "--selection reference" in reproduce_command(record(ref))
    card = make_model_card(record(ref)).text
    assert "| mask selection | reference: every score ≤ the one at index int(sparsity · size)" in card
    assert '"selection": "reference"' in card
    exact = PruneConfig(method="wanda", sparsity=0.5)
    assert "--selection" not in reproduce_command(record(exact))
    exact_card = make_model_card(record(exact)).text
    assert "| mask selection | exact: int(sparsity · size) weights of each group" in exact_card
    wanda_ref = record(PruneConfig(method="wanda", sparsity=0.5, selection="reference"))
    assert "stable sort" in make_model_card(wanda_ref).text
    old = record(exact)
    del old["config"]["prune"]["selection"], old["resolved"]["selection_rule"]  # a record from before the option
    assert "| mask selection | exact:" in make_model_card(old).text and "--selection" not in reproduce_command(old)


def test_sweep_passes_the_selection_on(monkeypatch, capsys, tmp_path):
    import llmprune.pipeline as pipeline
    from llmprune.cli import cmd_sweep

    seen = {}

    def fake_sweep(*args, **kwargs):
        seen.update(kwargs)
        return {"table": "t", "files": {}}

    monkeypatch.setattr(pipeline, "run_sweep", fake_sweep)
    assert cmd_sweep(["--selection", "reference", "--methods", "magnitude"]) == 0 and seen["selection"] == "reference"
    with pytest.raises(LLMPruneError, match="unknown selection"):  # every point is validated before any work
        pipeline._run_sweep(None, ["magnitude"], [0.5], ["unstructured"], CalibrationConfig(), ["wikitext2"], eval_seqlen=16,
                            output_dir=str(tmp_path / "sweep"), selection="ties")


# ---------------------------------------------------------------- on the GPU (run there with `pytest -m gpu`)


@pytest.mark.parametrize("shape,levels", [((256, 512), 3), ((64, 4096), 5)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reference_rules_are_their_restatements_and_the_same_as_on_the_cpu(shape, levels):
    s = few_levels(shape, levels).cuda()
    for sp in (0.2, 0.5):
        for group, restated in (("per-layer", restated_threshold), ("per-row", restated_stable_rows)):
            ref = reference_unstructured_mask(s, sp, group)
            assert torch.equal(ref, restated(s, sp))
            assert torch.equal(ref.cpu(), reference_unstructured_mask(s.cpu(), sp, group))  # values decide alone
    for n, m in [(2, 4), (4, 8), (8, 128)]:  # 8:128: M-N = 120, where exact-k takes a stable sort on the GPU
        ref = reference_nm_mask(s, n, m)
        assert torch.equal(ref, restated_nm(s, n, m))
        assert torch.equal(ref, nm_mask(s, n, m))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sparsegpt_reference_keeps_the_kernel_for_unstructured_and_the_eager_loop_for_n_m(monkeypatch):
    from llmprune.scorers import sparsegpt_triton

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2000, 256, device="cuda", generator=g)
    hinv, dead = sparsegpt_inverse_hessian(x.t() @ x)
    w = torch.round(2 * torch.randn(200, 256, device="cuda", generator=g)) / 2  # ties in the first lazy block
    blocks = []
    real_block = sg_mod._reference_lazy_block_mask

    def block_spy(W1, d, sparsity, group):
        mask = real_block(W1, d, sparsity, group)
        blocks.append((W1.clone(), d.clone(), sparsity, group, mask))
        return mask

    monkeypatch.setattr(sg_mod, "_reference_lazy_block_mask", block_spy)
    for group in ("per-layer", "per-row"):
        blocks.clear()
        a = sparsegpt_prune(w, hinv, dead, UNSTRUCTURED, group, 128, {}, use_triton=True, selection="reference")
        assert len(blocks) == 2 and sparsegpt_triton.available(w, 128, None)
        for W1, d, sparsity, grp, mask in blocks:
            tmp = W1 ** 2 / d.reshape(1, -1) ** 2
            assert torch.equal(mask, (restated_threshold if grp == "per-layer" else restated_stable_rows)(tmp, sparsity))
        b = sparsegpt_prune(w, hinv, dead, UNSTRUCTURED, group, 128, None, use_triton=False, selection="reference")
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert (a.mask[:, :128].sum(1) == 32).all()  # per-row, first block: exactly k per row

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel chose an N:M mask under reference selection")

    monkeypatch.setattr(sparsegpt_triton, "obs_block_", no_kernel)
    pat = Pattern.parse("2:4", None)
    a = sparsegpt_prune(w, hinv, dead, pat, "per-layer", 128, {}, use_triton=True, selection="reference")
    b = sparsegpt_prune(w, hinv, dead, pat, "per-layer", 128, None, use_triton=False, selection="reference")
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reference_magnitude_gives_the_cpu_model_bit_for_bit():
    # the threshold depends on the values alone: the same weights give the same zeros on either device
    cpu, gpu = tiny_model("llama"), tiny_model("llama")
    _quantize_blocks_(cpu)
    _quantize_blocks_(gpu)
    llmprune.prune(cpu, PruneConfig(method="magnitude", device="cpu", selection="reference"))
    llmprune.prune(gpu, PruneConfig(method="magnitude", device="cuda", selection="reference"))
    for a, b in zip(_layer_weights(cpu), _layer_weights(gpu)):
        assert torch.equal(a, b.cpu())
