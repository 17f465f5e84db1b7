"""The command line: an end-to-end run on a tiny saved model, the saved artifact, and bad input (exit 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune.cli import main
from llmprune.masks import check_nm

from conftest import data_dir

REPO = Path(__file__).resolve().parents[1]


def _args(model_dir, out=None, *extra):
    a = ["--model", str(model_dir), "--calib-data", "c4", "--data-dir", str(data_dir()), "--nsamples", "4",
         "--seqlen", "32", "--eval-max-windows", "2", "--device", "cpu", "-q"]
    if out is not None:
        a += ["--output-dir", str(out)]
    return a + list(extra)


def test_prune_evaluate_save_and_reload(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_args(tiny_model_dir, out, "--method", "sparsegpt", "--pattern", "2:4")) == 0
    printed = capsys.readouterr().out
    assert "wikitext2 perplexity (seqlen 32, 2 windows): dense" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        if "layers" in name and p.dim() == 2:
            assert check_nm(p, 2, 4), name
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    rec = json.loads((out / "llmprune.json").read_text())
    assert rec["config"]["prune"]["method"] == "sparsegpt" and rec["config"]["prune"]["pattern"] == "2:4"
    assert rec["calibration"]["nsamples"] == 4 and len(rec["calibration"]["token_sha256"]) == 64
    assert rec["seed"] == 0 and rec["versions"]["torch"] and rec["versions"]["transformers"]
    assert rec["sparsity"] == pytest.approx(0.5)
    assert len(rec["layer_sparsity"]) == 2 * 7
    for key in ("dense", "pruned"):
        w = rec["perplexity"][key]["wikitext2"]
        assert w["seqlen"] == 32 and w["windows"] == 2 and w["ppl"] > 1
    assert rec["timings"]["prune_total"] > 0 and rec["peak_memory"]["host_max_rss"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_existing_output_is_refused_then_replaced_with_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert main(_args(tiny_model_dir, out, "--method", "magnitude")) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "user data"
    assert main(_args(tiny_model_dir, out, "--method", "magnitude", "--overwrite", "--eval-ppl", "none")) == 0
    assert not (out / "mine.txt").exists() and (out / "llmprune.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.5"], "sparsity must be in [0, 1)"),
    (["--pattern", "4:2"], "N:M needs 1 <= N < M"),
    (["--pattern", "diagonal"], "unknown pattern 'diagonal'"),
    (["--method", "wanad"], "did you mean 'wanda'"),
    (["--comparison-group", "per-column"], "unknown comparison group"),
    (["--eval-ppl", "ptb"], "unknown perplexity dataset 'ptb'"),
    (["--nsamples", "20000", "--seqlen", "512"], "too little calibration text"),
    (["--sparsity", "abc"], "invalid float value"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(_args(tiny_model_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("llmprune: error:")
    assert not out.exists()


def test_unloadable_models_say_why(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--eval-ppl", "none"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["--model", "some-org/some-model", "--eval-ppl", "none"]) == 2  # HF_HUB_OFFLINE=1 in conftest
    assert "Hugging Face Hub was unreachable" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "llmprune", "--sparsity", "2", "--model", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["llmprune: error: sparsity must be in [0, 1), got 2.0"]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_gguf_model_saves_as_plain_safetensors(tmp_path, capsys):
    """The embedded SmolLM2 GGUF (marked quantized by transformers) prunes and saves as a plain model."""
    out = tmp_path / "smol"
    assert main(["--method", "magnitude", "--eval-ppl", "none", "--output-dir", str(out), "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    assert cfg["dtype"] == "bfloat16"  # --save-dtype auto: a quantized GGUF saves in bfloat16
    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[3].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    assert (out / "tokenizer.json").is_file()


def test_block_removal_then_wanda_2_4_in_one_run(tmp_path, capsys):
    from conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    d = tmp_path / "tiny4"
    tiny_model("qwen3", vocab_size=len(tok), num_hidden_layers=4).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "out"
    rc = main(_args(d, out, "--method", "wanda", "--pattern", "2:4", "--drop-blocks", "2",
                    "--block-method", "block-influence", "--protect-blocks", "0,-1"))
    assert rc == 0
    rec = json.loads((out / "llmprune.json").read_text())
    assert sorted(rec["blocks"]["removed"]) == [1, 2] and len(rec["blocks"]["scores"]) == 4
    assert rec["config"]["blocks"]["method"] == "block-influence" and rec["config"]["prune"]["pattern"] == "2:4"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    for name, p in model.named_parameters():
        if "layers" in name and p.dim() == 2:
            assert check_nm(p, 2, 4), name
    assert (out / "block_scores.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, message", [
    (["--method", "block-ppl"], "give --drop-blocks K or --drop-ratio R"),
    (["--method", "block-ppl", "--drop-blocks", "2"], "at least one must stay"),
    (["--method", "block-kl", "--drop-blocks", "1", "--protect-blocks", "0,1"], "not protected"),
    (["--method", "block-influense", "--drop-blocks", "1"], "did you mean 'block-influence'"),
])
def test_block_bad_input(tiny_model_dir, tmp_path, capsys, extra, message):
    assert main(_args(tiny_model_dir, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
