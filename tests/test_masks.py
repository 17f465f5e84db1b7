"""Hand-computed oracles for the mask patterns and the exact-zero hand-off."""

import pytest
import torch

from llmprune.config import Pattern
from llmprune.errors import LLMPruneError
from llmprune.masks import apply_mask_, check_nm, nm_mask, select_mask, unstructured_mask

S = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                  [0.5, 8.0, 7.0, 6.0]])


def test_unstructured_per_row_prunes_lowest_of_each_row():
    mask = unstructured_mask(S, 0.5, "per-row")
    expected = torch.tensor([[False, True, False, True],   # 1 and 2 are the row's lowest
                             [True, False, False, True]])  # 0.5 and 6
    assert torch.equal(mask, expected)


def test_unstructured_per_layer_prunes_lowest_of_whole_matrix():
    mask = unstructured_mask(S, 0.5, "per-layer")
    # the four lowest of {4,1,3,2,0.5,8,7,6} are 0.5, 1, 2, 3
    expected = torch.tensor([[False, True, True, True],
                             [True, False, False, False]])
    assert torch.equal(mask, expected)


def test_unstructured_count_is_floor_of_sparsity_times_size():
    s = torch.arange(10.0).reshape(1, 10)
    assert unstructured_mask(s, 0.35, "per-row").sum() == 3
    assert unstructured_mask(s, 0.0, "per-layer").sum() == 0


def test_ties_still_prune_exactly_k_and_repeatably():
    s = torch.ones(3, 8)
    m = unstructured_mask(s, 0.5, "per-row")
    assert (m.sum(1) == 4).all() and torch.equal(m, unstructured_mask(s, 0.5, "per-row"))
    assert unstructured_mask(s, 0.5, "per-layer").sum() == 12
    assert (nm_mask(s, 2, 4).reshape(3, 2, 4).sum(-1) == 2).all()


def test_nm_2_4_keeps_two_largest_in_each_group_of_four():
    s = torch.tensor([[1.0, 5.0, 3.0, 2.0, 9.0, 0.0, 8.0, 7.0]])
    mask = nm_mask(s, 2, 4)
    expected = torch.tensor([[True, False, False, True, False, True, False, True]])
    assert torch.equal(mask, expected)


def test_nm_1_4_and_4_8():
    s = torch.arange(8.0).reshape(1, 8)
    assert torch.equal(nm_mask(s, 1, 4), torch.tensor([[True, True, True, False, True, True, True, False]]))
    assert torch.equal(nm_mask(s, 4, 8), torch.tensor([[True] * 4 + [False] * 4]))


def test_nm_rejects_width_not_divisible():
    with pytest.raises(LLMPruneError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_pattern_parsing_and_validation():
    assert Pattern.parse("2:4", None).sparsity == 0.5
    assert Pattern.parse("3:8", None).sparsity == pytest.approx(5 / 8)
    assert Pattern.parse("unstructured", None).sparsity == 0.5
    for bad, msg in [("4:4", "N < M"), ("5:4", "N < M"), ("0:4", "N < M"), ("2-4", "unknown pattern")]:
        with pytest.raises(LLMPruneError, match=msg):
            Pattern.parse(bad, None)
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(LLMPruneError, match=r"\[0, 1\)"):
            Pattern.parse("unstructured", s)
    with pytest.raises(LLMPruneError, match="fixes the sparsity"):
        Pattern.parse("2:4", 0.3)


def test_select_mask_dispatch():
    assert torch.equal(select_mask(S, Pattern.parse("2:4", None)), nm_mask(S, 2, 4))
    assert torch.equal(select_mask(S, Pattern.parse("unstructured", 0.5), "per-layer"),
                       unstructured_mask(S, 0.5, "per-layer"))


def test_apply_mask_writes_positive_zeros_only():
    w = torch.tensor([[-1.0, -2.0, 3.0, -0.5]])
    mask = torch.tensor([[True, True, False, False]])
    apply_mask_(w, mask)
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 3.0, -0.5]]))
    assert not torch.signbit(w[mask]).any(), "pruned entries must be +0.0, not -0.0"


def test_check_nm():
    assert check_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), 2, 4)
    assert not check_nm(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), 2, 4)


def test_group_ranks_oracle_and_nm_equivalence():
    """The elementwise ranking used for N:M on the GPU: a hand-made group with ties, and the same masks as the
    topk path wherever a group has no ties."""
    from llmprune.masks import group_ranks, lowest_k

    g = torch.tensor([[[3.0, 1.0, 1.0, 2.0]]])
    assert group_ranks(g).tolist() == [[[3, 0, 1, 2]]]  # the tie goes to the lower position first
    torch.manual_seed(0)
    scores = torch.randn(8, 32)
    groups = scores.reshape(8, 8, 4)
    by_rank = group_ranks(groups) < 2
    by_topk = torch.zeros_like(by_rank).scatter_(-1, lowest_k(groups, 2, -1), True)
    assert torch.equal(by_rank, by_topk)
