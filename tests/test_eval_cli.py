"""`llmprune eval`, `--eval` on the prune command, and `llmprune sweep` on a tiny model."""

import json
import math

import pytest

from llmprune.cli import main

from conftest import data_dir


def test_eval_writes_results_json_and_wanda_style_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2,arc_easy", "--seqlen", "32",
               "--max-windows", "3", "--limit", "4", "--data-dir", str(data_dir()), "--output", str(out), "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| Method | ARC-e | Mean |" in printed and "WikiText-2 ppl" in printed
    rec = json.loads((out / "results.json").read_text())
    ppl = rec["results"]["perplexity"]["wikitext2"]
    assert ppl["seqlen"] == 32 and ppl["windows"] == 3 and math.isfinite(ppl["ppl"]) and ppl["tokens_per_s"] > 0
    arc = rec["results"]["zero_shot"]["tasks"]["arc_easy"]
    assert arc["n"] == 4 and 0 <= arc["acc"] <= 1 and arc["acc_norm"] is not None
    assert rec["results"]["zero_shot"]["lm_eval_version"]
    assert rec["compression"]["total_params"] > 0 and rec["versions"]["torch"]
    md = (out / "results.md").read_text()  # a title, the metrics, the window and --limit, then the tables
    assert md.startswith(f"# Evaluation of {tiny_model_dir.name}\n") and "\n| Method | ARC-e | Mean |" in md
    assert "- Window: 32 tokens per perplexity window" in md and "WikiText-2: 3 windows, `--max-windows 3`" in md
    assert "`--limit 4`" in md and "> **Warning:** `--limit 4` is small" in md and "lm-eval `acc`" in md
    # the details: n, majority-class baseline and chance beside acc ± stderr, and the --limit warning
    assert "| Task | n | Majority | Chance |" in printed
    assert f"| ARC-e | 4 | {100 * arc['majority_baseline']:.1f} |" in printed
    assert arc["chance"] == pytest.approx(0.25, abs=0.05) and arc["noisy"] and arc["acc_stderr"] is not None
    assert "- Too noisy to compare models" in printed and "ARC-e (n=4 of 2376" in printed


def test_unknown_task_lists_known_ones(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easyy"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'arc_easy'" in err and "wikitext2" in err and "hellaswag" in err


def test_missing_local_data_says_where(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "boolq", "--data-dir", str(empty), "-q"]) == 2
    assert str(empty) in capsys.readouterr().err


def test_prune_with_eval_saves_results_beside_the_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["--model", str(tiny_model_dir), "--method", "wanda", "--nsamples", "4", "--seqlen", "32",
               "--data-dir", str(data_dir()), "--eval-ppl", "none", "--eval", "rte", "--limit", "3",
               "--output-dir", str(out), "-q"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["zero_shot"]["tasks"]["rte"]["n"] == 3
    assert res["pruning"]["prune"]["method"] == "wanda"
    md = (out / "results.md").read_text()
    assert md.startswith(f"# Evaluation of {tiny_model_dir.name} after wanda unstructured\n")
    assert "| wanda unstructured |" in md
    assert "on RTE" in md and "`--limit 3`" in md and "> **Warning:** `--limit 3` is small: with 3 examples" in md


def test_sweep_writes_one_results_file_a_table_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--model", str(tiny_model_dir), "--methods", "magnitude,wanda", "--sparsities", "0.2,0.6",
               "--patterns", "unstructured,2:4", "--nsamples", "4", "--seqlen", "32", "--max-windows", "2",
               "--data-dir", str(data_dir()), "--output-dir", str(out), "-q"])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    points = {(r["method"], r["pattern"], r["sparsity"]) for r in data["records"]}
    assert ("wanda", "unstructured", 0.6) in points and ("magnitude", "2:4", 0.5) in points
    assert len(data["records"]) == 1 + 2 * 3
    table = (out / "sweep.md").read_text()
    assert "Wanda" in table and "2:4" in table and "60%" in table
    assert table.startswith(f"# Sweep of {tiny_model_dir.name}: perplexity by method and sparsity\n")
    assert "  - perplexity on WikiText-2: exp of the mean next-token negative log-likelihood" in table
    assert "- Window: 32 tokens per perplexity window, non-overlapping (WikiText-2: 2 windows, `--max-windows 2`)" \
        in table
    assert "- `--limit`: none (no zero-shot task)" in table and "Warning" not in table
    for png in ("ppl_vs_sparsity_wikitext2.png", "layer_sparsity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in data["records"][1:]:
        assert r["measured_sparsity"] == pytest.approx(r["sparsity"], abs=0.05)  # int(s * width) per row
        assert math.isfinite(r["ppl"]["wikitext2"])


def test_sweep_bad_point_fails_before_loading(tiny_model_dir, tmp_path, capsys):
    assert main(["sweep", "--model", str(tiny_model_dir), "--sparsities", "0.5,1.2",
                 "--output-dir", str(tmp_path / "s")]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_eval_with_sparse_kernels_on_cpu_records_why_they_were_not_used(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res"
    base = ["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--seqlen", "32", "--max-windows", "3",
            "--data-dir", str(data_dir()), "-q"]
    assert main([*base, "--output", str(out)]) == 0
    assert main([*base, "--output", str(out / "sk"), "--sparse-kernels"]) == 0
    printed = capsys.readouterr().out
    assert "2:4 sparse kernels not used:" in printed
    plain, sk = (json.loads((d / "results.json").read_text()) for d in (out, out / "sk"))
    assert plain["sparse_kernels"] is None
    assert sk["sparse_kernels"]["status"] == "fallback" and sk["sparse_kernels"]["reason"]
    assert sk["results"]["perplexity"]["wikitext2"]["ppl"] == plain["results"]["perplexity"]["wikitext2"]["ppl"]
    assert sk["compression"]["total_params"] == plain["compression"]["total_params"]


def test_sparse_kernels_with_compile_is_refused_in_one_line(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--sparse-kernels", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile with --sparse-kernels" in err[0]


def test_eval_never_replaces_earlier_results_without_overwrite(tiny_model_dir, tmp_path, capsys):
    """A folder that already holds results.json (e.g. a pruned model's own, which push uploads) is refused before
    the model loads; --overwrite replaces it; a folder another run has locked is refused even then."""
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}\n')
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--eval-seqlen", "32",
            "--eval-max-windows", "1", "--data-dir", str(data_dir()), "--output-dir", str(out), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds results.json from an earlier run; pass --overwrite" in err
    assert json.loads((out / "results.json").read_text()) == {"mine": True} and not (out / "results.md").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["results"]["perplexity"]["wikitext2"]["windows"] == 1
    (out / ".llmprune-lock").write_text("123\n")
    assert main([*argv, "--overwrite"]) == 2 and "being written by another llmprune run" in capsys.readouterr().err


def test_prune_tasks_keep_the_eval_options_without_eval_ppl(tiny_model_dir, tmp_path):
    """--eval-ppl none --tasks wikitext2: the task still honours --eval-seqlen/--eval-max-windows (it ran every
    window at the calibration length before), and the card's command says so."""
    out = tmp_path / "m"
    assert main(["--model", str(tiny_model_dir), "--method", "magnitude", "--eval-ppl", "none", "--tasks", "wikitext2",
                 "--seqlen", "16", "--eval-seqlen", "24", "--eval-max-windows", "2", "--data-dir", str(data_dir()),
                 "--output-dir", str(out), "-q"]) == 0
    ppl = json.loads((out / "results.json").read_text())["results"]["perplexity"]["wikitext2"]
    assert (ppl["windows"], ppl["seqlen"]) == (2, 24)
    card = (out / "README.md").read_text()
    assert "--eval-seqlen 24" in card and "--eval-max-windows 2" in card
