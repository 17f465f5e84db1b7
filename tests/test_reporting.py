"""Compression accounting (parameters, FLOPs, N:M validity), Markdown tables, plots and the JSON writer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, tiny_model
from llmprune.errors import LLMPruneError
from llmprune.evaluation.compression import attention_flops, compression_report, forward_flops
from llmprune.masks import apply_mask_, nm_mask
from llmprune.reporting import (plot_layer_sparsity, plot_ppl_vs_sparsity, ppl_table, results_table,
                                write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Tiny Llama of conftest: hidden 32, intermediate 64, 2 blocks, 4 heads (head_dim 8), 2 KV heads, vocab 96.
H, I, L, HEADS, KV, D, V = 32, 64, 2, 4, 2, 8, 96
BLOCK_LINEAR = L * (H * HEADS * D + 2 * H * KV * D + HEADS * D * H + 3 * H * I)  # q, k+v, o, gate/up/down
LM_HEAD = V * H
NORMS = L * 2 * H + H  # two RMSNorms per block, one final
SEQ = 16
ATTENTION = 2 * 2 * SEQ * SEQ * HEADS * D * L
DENSE_FLOPS = 2 * (BLOCK_LINEAR + LM_HEAD) * SEQ + ATTENTION


def test_hand_counts_match_the_formula():
    # Spelled out once more, so the constants above are themselves checked.
    assert BLOCK_LINEAR == 2 * (1024 + 512 + 512 + 1024 + 3 * 2048) == 18432
    assert ATTENTION == 65536
    assert DENSE_FLOPS == 2 * (18432 + 3072) * 16 + 65536 == 753664


@pytest.mark.parametrize("tied", [False, True])
def test_params_and_flops_of_tiny_llama(tied):
    model = tiny_model("llama", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    r = compression_report(model, seqlen=SEQ)
    total = BLOCK_LINEAR + NORMS + V * H + (0 if tied else LM_HEAD)  # the tied LM head is the embedding
    assert r["total_params"] == total == (21664 if tied else 24736)
    assert r["nonzero_params"] == total
    assert r["compression_ratio"] == 1.0
    assert r["block_linear_params"] == BLOCK_LINEAR
    assert r["block_linear_sparsity"] == 0.0
    f = r["flops"]
    # A tied head is stored once but still multiplies every token: FLOPs do not depend on tying.
    assert (f["n_heads"], f["head_dim"], f["n_layers"], f["lm_head_params"]) == (HEADS, D, L, LM_HEAD)
    assert f["attention"] == ATTENTION and f["attention_causal_halved"] is False
    assert f["dense"] == f["sparse"] == DENSE_FLOPS
    assert f["dense_over_sparse"] == 1.0
    assert len(r["layers"]) == 7 * L and list(r["blocks"]) == ["model.layers.0", "model.layers.1"]


def test_forward_flops_from_config_alone():
    cfg = tiny_model("llama").config
    f = forward_flops(cfg, SEQ)
    assert f["block_linear_params"] == BLOCK_LINEAR and f["lm_head_params"] == LM_HEAD
    assert f["linear"] == 2 * BLOCK_LINEAR * SEQ and f["lm_head"] == 2 * LM_HEAD * SEQ
    assert f["attention"] == ATTENTION and f["total"] == DENSE_FLOPS
    assert (f["n_heads"], f["n_kv_heads"], f["head_dim"], f["gated_mlp"]) == (HEADS, KV, D, True)
    causal = forward_flops(cfg, SEQ, causal=True, batch_size=3)
    assert causal["attention"] == 3 * ATTENTION // 2 and causal["attention_causal_halved"] is True
    assert causal["total"] == 3 * (2 * (BLOCK_LINEAR + LM_HEAD) * SEQ + ATTENTION // 2)
    assert forward_flops(cfg, SEQ, include_lm_head=False)["total"] == DENSE_FLOPS - 2 * LM_HEAD * SEQ
    assert attention_flops(SEQ, HEADS, D, L) == ATTENTION


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_flops_agrees_with_the_model_count(family):
    """The config-only count equals the count over the built model's linear layers (fused, Conv1D, ungated)."""
    model = tiny_model(family)
    assert forward_flops(model.config, 8)["total"] == compression_report(model, seqlen=8)["flops"]["dense"]


def test_compression_after_zeroing_known_weights():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight  # (32, 32)
    with torch.no_grad():
        q[:16].zero_()  # 512 zeros
    r = compression_report(model, dense_params=30000, seqlen=SEQ)
    total = 24736
    assert r["total_params"] == total and r["nonzero_params"] == total - 512
    assert r["compression_ratio"] == pytest.approx(total / (total - 512))
    assert r["compression_ratio_vs_dense"] == pytest.approx(30000 / (total - 512))
    assert r["layers"]["model.layers.0.self_attn.q_proj"] == 0.5
    assert r["layers"]["model.layers.1.self_attn.q_proj"] == 0.0
    assert r["blocks"]["model.layers.0"] == pytest.approx(512 / (BLOCK_LINEAR // 2))
    assert r["blocks"]["model.layers.1"] == 0.0
    assert r["block_linear_sparsity"] == pytest.approx(512 / BLOCK_LINEAR)
    assert r["block_linear_nonzero"] == BLOCK_LINEAR - 512
    assert r["flops"]["dense"] == DENSE_FLOPS
    assert r["flops"]["sparse"] == DENSE_FLOPS - 2 * 512 * SEQ
    assert r["flops"]["dense_over_sparse"] == pytest.approx(DENSE_FLOPS / (DENSE_FLOPS - 2 * 512 * SEQ))
    assert "nm" not in r


def test_nm_validity_per_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers:
            for layer in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                          block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                apply_mask_(layer.weight, nm_mask(layer.weight.abs(), 2, 4))
    r = compression_report(model, seqlen=SEQ, pattern=(2, 4))
    assert r["nm"]["pattern"] == "2:4" and r["nm"]["valid"] is True
    assert all(r["nm"]["layers"].values()) and len(r["nm"]["layers"]) == 14
    assert r["block_linear_sparsity"] == 0.5

    bad = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        row = bad[0, :4]
        row[row == 0] = 1.0  # 4 non-zeros in the first group of 4
    r = compression_report(model, seqlen=SEQ, pattern=(2, 4))
    assert r["nm"]["valid"] is False
    invalid = [k for k, ok in r["nm"]["layers"].items() if not ok]
    assert invalid == ["model.layers.1.mlp.up_proj"]
    # 2:4 implies 4:8; the broken row's first group of 8 now holds 6 non-zeros.
    r48 = compression_report(model, seqlen=SEQ, pattern=(4, 8))
    assert [k for k, ok in r48["nm"]["layers"].items() if not ok] == ["model.layers.1.mlp.up_proj"]


def test_compression_report_validates_its_arguments():
    model = tiny_model("llama")
    for bad in [(0, 4), (5, 4), "2:4", (2,)]:
        with pytest.raises(LLMPruneError):
            compression_report(model, pattern=bad)
    with pytest.raises(LLMPruneError):
        compression_report(model, seqlen=0)
    with pytest.raises(LLMPruneError):
        compression_report(model, dense_params=-1)


def test_results_table_exact_markdown():
    rows = [("Magnitude", {"BoolQ": 1.0, "PIQA": 2.5}), ("Wanda", {"BoolQ": 3.125})]
    expected = (
        "| Method | BoolQ | PIQA | Mean |\n"
        "| :--- | ---: | ---: | ---: |\n"
        "| Magnitude | 1.00 | 2.50 | 1.75 |\n"
        "| Wanda | 3.12 | - | - |\n"
    )
    assert results_table(rows, ["BoolQ", "PIQA"]) == expected
    no_mean = results_table(rows, ["BoolQ", "PIQA"], mean=False, fmt="{:.1f}")
    assert no_mean.splitlines()[0] == "| Method | BoolQ | PIQA |"
    assert no_mean.splitlines()[3] == "| Wanda | 3.1 | - |"


def test_results_table_rejects_bad_rows():
    with pytest.raises(LLMPruneError):
        results_table([("Wanda", [1.0])], ["BoolQ"])
    with pytest.raises(LLMPruneError):
        results_table([("Wanda", {"BoolQ": 1.0})], ["BoolQ"], fmt="{:d}")


RECORDS = [
    {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "ppl": {"wikitext2": 7.26}},
    {"method": "dense", "pattern": "unstructured", "sparsity": 0.0, "ppl": {"wikitext2": 5.68}},
    {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, "ppl": {"wikitext2": 17.29}},
    {"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "ppl": {"wikitext2": {"ppl": 11.53, "windows": 4}}},
    {"method": "magnitude", "pattern": "4:8", "sparsity": 0.5, "ppl": {"wikitext2": 16.84}},
    {"method": "wanda", "pattern": "unstructured", "sparsity": 0.6, "ppl": {"wikitext2": 10.7}},
]


def test_ppl_table():
    expected = (
        "| Method | 50% | 60% | 4:8 | 2:4 |\n"
        "| :--- | ---: | ---: | ---: | ---: |\n"
        "| Dense | 5.68 | 5.68 | 5.68 | 5.68 |\n"
        "| Wanda | 7.26 | 10.70 | - | 11.53 |\n"
        "| Magnitude | 17.29 | - | 16.84 | - |\n"
    )
    assert ppl_table(RECORDS) == expected
    two = ppl_table([{"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5, "ppl": {"wikitext2": 1, "c4": 2}}])
    assert two.splitlines()[0] == "| Method | 2:4 wikitext2 | 2:4 c4 |"
    assert two.splitlines()[2] == "| SparseGPT | 1.00 | 2.00 |"
    with pytest.raises(LLMPruneError):
        ppl_table([{"method": "wanda", "pattern": "2-4", "ppl": {"wikitext2": 1.0}}])


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plots_write_png(tmp_path):
    p = plot_ppl_vs_sparsity(RECORDS, tmp_path / "plots" / "ppl.png")
    assert p == tmp_path / "plots" / "ppl.png"
    _assert_png(p)
    model = tiny_model("llama")
    layers = compression_report(model, seqlen=SEQ)["layers"]
    layers = {k: (0.5 if "proj" in k else 0.0) + 0.01 * i for i, k in enumerate(layers)}
    _assert_png(plot_layer_sparsity(layers, tmp_path / "layers.png"))
    with pytest.raises(LLMPruneError):
        plot_ppl_vs_sparsity(RECORDS, tmp_path / "none.png", dataset="c4")
    with pytest.raises(LLMPruneError):
        plot_layer_sparsity({}, tmp_path / "empty.png")


def test_write_json_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "results" / "run.json"
    assert write_json(path, {"a": 1, "ppl": [1.5, 2.0]}) == path
    assert json.loads(path.read_text()) == {"a": 1, "ppl": [1.5, 2.0]}
    write_json(path, {"a": 2, "path": tmp_path})  # replaces; Path via str()
    assert json.loads(path.read_text()) == {"a": 2, "path": str(tmp_path)}
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        write_json(path, loop)  # circular: fails before anything is written
    assert json.loads(path.read_text())["a"] == 2  # the old file survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]  # no temporary file left
