"""What the record counts and resolves: zeros before and after pruning (block linear weights and the whole
model), the comparison group / data folders / zero-shot length actually used, block removal that keeps every
per-layer config field consistent, and saved files with the folder's usual permissions."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune.blocks.removal import remove_blocks, sliding_period
from llmprune.cli import format_summary
from llmprune.config import CalibrationConfig, EvalConfig, PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.evaluation.compression import zero_counts
from llmprune.models import current_umask, find_blocks, save_pretrained_atomic
from llmprune.pipeline import run_prune_job

from conftest import calib_tokens, data_dir, tiny_model, tiny_tokenizer

S, F = "sliding_attention", "full_attention"


def _no_zeros(model):
    """Replace any exact zero a random init left by 0.5, so that the zeros a test sets are the only ones."""
    with torch.no_grad():
        for p in model.parameters():
            p.masked_fill_(p == 0, 0.5)
    return model


def _set_zeros(model):
    """Known zeros: 3 rows of block 0's q_proj (3 x 32), 10 entries of block 1's down_proj, 5 entries of the
    (tied) embedding. Returns (block linear zeros, all zeros)."""
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:3] = 0
        model.model.layers[1].mlp.down_proj.weight.view(-1)[:10] = 0
        model.model.embed_tokens.weight.view(-1)[7:12] = 0
    return 3 * 32 + 10, 3 * 32 + 10 + 5


def _tied_llama(vocab_size=96):
    model = _no_zeros(tiny_model("llama", vocab_size=vocab_size, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _block_linear_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight"))


def test_zero_counts_are_exact_and_count_tied_weights_once():
    model = _tied_llama()
    lin_zeros, all_zeros = _set_zeros(model)
    lin = _block_linear_params(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert total < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    z = zero_counts(model)
    assert z == {"block_linear": lin_zeros / lin, "model": all_zeros / total, "block_linear_zeros": lin_zeros,
                 "block_linear_params": lin, "model_zeros": all_zeros, "model_params": total}


def _saved(tmp_path, model, tok, name="base"):
    d = tmp_path / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_prune_record_zeros_before_model_sparsity_and_resolved_values(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = _tied_llama(len(tok))
    lin_zeros, all_zeros = _set_zeros(model)
    lin, total = _block_linear_params(model), sum(p.numel() for p in model.parameters())
    src = _saved(tmp_path, model, tok)
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(data_dir()))  # data_dir=None below: the variable is what is read
    calib = CalibrationConfig(source="c4", nsamples=2, seqlen=16)
    out = tmp_path / "pruned"
    rec = run_prune_job(str(src), PruneConfig(method="wanda", sparsity=0.5, device="cpu"), calib,
                        EvalConfig(datasets=("wikitext2",), seqlen=16, max_windows=1), output_dir=str(out))

    assert rec.zeros_before.to_dict() == {"block_linear": lin_zeros / lin, "model": all_zeros / total,
                                   "block_linear_zeros": lin_zeros, "block_linear_params": lin,
                                   "model_zeros": all_zeros, "model_params": total}
    # Wanda per row: the int(0.5 x width) lowest scores of every row become zero, the preset zeros among them
    # (score 0). The 3 all-zero rows of q_proj keep all 32 zeros, 16 more than half; down_proj's row 0 had 10 < 32.
    # Outside the blocks only the 5 embedding zeros remain (embeddings are never pruned).
    lin_after = lin // 2 + 3 * 16
    assert rec.zeros_after.block_linear_zeros == lin_after and rec.sparsity == lin_after / lin
    assert rec.zeros_after.model_zeros == lin_after + 5
    assert rec.model_sparsity == (lin_after + 5) / total
    assert rec.config.prune["comparison_group"] is None and rec.config.calibration["data_dir"] is None
    assert rec.resolved.comparison_group == "per-row"
    # the data folder that was read, as every saved path: portable (export.provenance), its files under data_files
    assert rec.resolved.data_dir == {"calibration": "<data-dir>", "eval": "<data-dir>"}

    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["model_sparsity"] == rec.model_sparsity and saved["zeros_before"] == rec.zeros_before.to_dict()
    assert saved["resolved"] == rec.resolved.to_dict()
    assert {**saved, "output_dir": rec.output_dir} == rec.to_dict()  # the file is the record

    line = next(x for x in format_summary(rec).splitlines() if x.startswith("method:"))
    assert line.endswith(f"-> {100 * lin_after / lin:.2f} % of block linear weights are zero "
                         f"({100 * (lin_after + 5) / total:.2f} % of all parameters; {100 * lin_zeros / lin:.2f} % were "
                         "zero before pruning)")
    card = (out / "README.md").read_text()
    assert f"| zeros in the whole model (all parameters, embeddings included) | {100 * rec.model_sparsity:.2f} %" in card
    assert (f"| zeros before pruning (blocks' linear layers / whole model) | {100 * lin_zeros / lin:.2f} % / "
            f"{100 * all_zeros / total:.2f} % |") in card
    assert "| comparison group | per-row (the method's default) |" in card
    assert (f"({100 * lin_after / lin:.2f} % of the blocks' linear weights are exact zeros, "
            f"{100 * rec.model_sparsity:.2f} % of all parameters)") in card


def test_resolved_group_of_n_m_and_given_groups():
    assert PruneConfig(method="wanda", pattern="2:4").effective_group == "per-4-block"
    assert PruneConfig(method="magnitude", pattern="4:8", comparison_group="per-row").effective_group == "per-8-block"
    assert PruneConfig(method="magnitude").effective_group == "per-layer"
    assert PruneConfig(method="magnitude", comparison_group="per-row").effective_group == "per-row"


def test_block_only_job_records_measured_zeros(tmp_path):
    tok = tiny_tokenizer()
    model = _tied_llama(len(tok))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:2] = 0  # block 0 is kept, block 1 removed
    src = _saved(tmp_path, model, tok)
    from llmprune.blocks import BlockPruneConfig

    rec = run_prune_job(str(src), None, CalibrationConfig(source="c4", nsamples=2, seqlen=16, data_dir=str(data_dir())),
                        None, block_cfg=BlockPruneConfig("block-influence", num_blocks=1, protect=(0,), device="cpu"))
    lin_after = _block_linear_params(model) // 2
    assert rec.blocks.removed == [1]
    assert rec.zeros_before.block_linear_zeros == 2 * 32
    assert rec.sparsity == 2 * 32 / lin_after and rec.zeros_after.block_linear_params == lin_after
    assert "comparison_group" not in rec.to_dict()["resolved"]
    assert rec.resolved.data_dir == {"calibration": "<data-dir>"}
    assert "zeros: " in format_summary(rec) and "were zero before pruning" in format_summary(rec)


def test_zero_shot_records_the_context_length_it_used():
    from llmprune.evaluation.harness import evaluate

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=128)
    res = evaluate(model, tok, ["arc_easy"], seqlen=2048, limit=2, device="cpu", data_dir=str(data_dir()))
    assert res["zero_shot"]["max_length"] == 128 and res["seqlen"] == 128  # not the perplexity window
    assert res["data_dir"] == str(data_dir().resolve())
    both = evaluate(model, tok, ["wikitext2", "arc_easy"], seqlen=32, limit=2, max_windows=1, device="cpu",
                    data_dir=str(data_dir()))
    assert both["seqlen"] == 32 and both["perplexity"]["wikitext2"]["seqlen"] == 32
    assert both["zero_shot"]["max_length"] == 128


# ---------------------------------------------------------------- block removal: consistent per-layer config


def test_sliding_period():
    assert sliding_period([S, F, S, F]) == 2
    assert sliding_period([S, S, F, S, S, F]) == 3
    assert sliding_period([F, F]) == 1
    assert sliding_period([S, S]) == 3  # no full layer among 2: any period > 2, the smallest
    assert sliding_period([S, F, S, S, F]) is None
    assert sliding_period([S, "chunked_attention"]) is None


def _attention(model):
    """Per block: the attention settings its modules were built with."""
    keys = ("attention_type", "layer_type", "is_sliding", "sliding_window")
    return [{f"{n}.{k}": vars(m)[k] for n, m in b.named_modules() for k in keys if k in vars(m)}
            for b in find_blocks(model).modules]


CASES = {  # family, config overrides, blocks removed, expected layer_types after (None: the family has none)
    "gemma3-period-kept": ("gemma3", dict(num_hidden_layers=6, sliding_window_pattern=3), [4, 5], [S, S, F, S]),
    "gemma3-period-lost": ("gemma3", dict(num_hidden_layers=6, sliding_window_pattern=3), [0], [S, F, S, S, F]),
    "gemma3-full-removed": ("gemma3", dict(num_hidden_layers=4, sliding_window_pattern=2), [1], [S, S, F]),
    "gemma2": ("gemma2", dict(num_hidden_layers=4), [0], [F, S, F]),
    "qwen2-max-window": ("qwen2", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=2), [0], [F, S, S]),
    "mistral-sliding": ("mistral", dict(num_hidden_layers=3), [1], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_removal_keeps_per_layer_config_consistent_and_reloads_the_same_model(case, tmp_path):
    family, overrides, removed, types_after = CASES[case]
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tok), **overrides)
    kept = [i for i in range(overrides["num_hidden_layers"]) if i not in removed]
    want_attention = [a for i, a in enumerate(_attention(model)) if i in kept]
    rep = remove_blocks(model, removed)
    cfg = model.config
    if types_after is not None:
        assert cfg.layer_types == types_after
    if family == "gemma3":
        p = sliding_period(types_after)
        assert cfg.sliding_window_pattern == p and cfg._sliding_window_pattern == p
        assert (p == overrides["sliding_window_pattern"]) == ("sliding_window_pattern" not in rep["config_updates"])
    if family == "qwen2":
        assert cfg.max_window_layers == 1
    out = save_pretrained_atomic(model, tok, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    rc = again.config
    assert rc.num_hidden_layers == len(kept) and saved["num_hidden_layers"] == len(kept)
    if types_after is not None:
        assert list(rc.layer_types) == types_after and saved["layer_types"] == types_after
    if family == "gemma3":
        assert saved["sliding_window_pattern"] == p and rc._sliding_window_pattern == p
    assert _attention(again) == want_attention
    tokens = calib_tokens(n=2, seqlen=12, vocab_size=len(tok))
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_removal_refused_when_a_block_would_reload_with_other_attention():
    model = tiny_model("gemma3", num_hidden_layers=4, sliding_window_pattern=2)
    model.model.layers[2].self_attn.sliding_window = 2  # built otherwise than its config says
    with pytest.raises(LLMPruneError, match=r"block 2 \(then 1\) would reload with self_attn.sliding_window=4 "
                                            r"instead of 2"):
        remove_blocks(model, [1])
    assert len(find_blocks(model)) == 4 and model.config.layer_types == [S, F, S, F]


# ---------------------------------------------------------------- permissions of saved files


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [None, 0o027])
def test_saved_files_get_the_modes_of_files_created_with_open(tmp_path, umask):
    old = os.umask(0o022 if umask is None else umask)
    if umask is None:  # the process's own umask
        os.umask(old)
        umask, old = old, None
    try:
        assert current_umask() == umask
        out = save_pretrained_atomic(tiny_model("llama"), tiny_tokenizer(), tmp_path / "out", {"llmprune.json": {}},
                                     extra=lambda d: (d / "sub").mkdir() or (d / "sub" / "x.txt").write_text("x"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        (tmp_path / "plain_dir").mkdir()
    finally:
        if old is not None:
            os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "tokenizer.json", "llmprune.json", "x.txt"}
    assert {p.name: _mode(p) for p in files} == {p.name: _mode(tmp_path / "plain.txt") for p in files}
    assert _mode(out) == _mode(out / "sub") == _mode(tmp_path / "plain_dir")
