"""Issue 11 items 3 and 5: every known bad input is one line on stderr and exit code 2 (never a traceback), an
unexpected error is one line naming the step it came from (exit 1; --debug adds the traceback), and one command
line: top-level help, --version, did-you-mean, the same option names on every command, defaults in every help."""

import json
import re
import types

import pytest
import torch

from llmprune import cli, pipeline
from llmprune.cli import main
from llmprune.errors import LLMPruneError, current_step, failed_step, set_step, step, step_detail, summary

from conftest import tiny_model, tiny_tokenizer

QUIET = ["--device", "cpu", "-q"]


def _one_line(err: str, code_seen: int, code: int = 2) -> str:
    """The single `llmprune: error:` line of stderr (progress bars aside), no traceback, and the exit code."""
    assert code_seen == code, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not line.startswith("warning:")]
    lines = [line for line in lines if "it/s]" not in line and "block/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("llmprune: error:"), err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a check that should come before loading the model comes after it."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_model", fail)


@pytest.fixture
def token_files(tmp_path):
    torch.save(torch.zeros(0, 16, dtype=torch.int64), tmp_path / "zero.pt")
    torch.save(torch.randint(0, 90, (4, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "t16.pt")
    return tmp_path


# ---------------------------------------------------------------- bad input refused before the model loads

@pytest.mark.parametrize("argv, message", [
    (["eval", "--limit", "0", "--tasks", "boolq"], "argument --limit: expected a positive integer, got '0'"),
    (["eval", "--max-windows", "0"], "expected a positive integer or all, got '0'"),
    (["--eval-max-windows", "0"], "expected a positive integer or all, got '0'"),
    (["sweep", "--max-windows", "-3"], "expected a positive integer or all, got '-3'"),
    (["--nsamples", "0"], "argument --nsamples: expected a positive integer, got '0'"),
    (["--eval-seqlen", "-1"], "argument --eval-seqlen: expected a positive integer"),
    (["eval", "--tasks", ""], "argument --tasks/--eval: expected a comma-separated list of one or more values"),
    (["eval", "--tasks", "none"], "expected a comma-separated list of one or more values"),
    (["sweep", "--methods", ""], "argument --methods: expected a comma-separated list"),
    (["sweep", "--sparsities", ","], "argument --sparsities: expected a comma-separated list"),
    (["sweep", "--patterns", ""], "argument --patterns: expected a comma-separated list"),
    (["sweep", "--tasks", ""], "argument --tasks/--eval: expected a comma-separated list"),
    (["--output-dir", ""], "argument --output-dir: expected a folder, got an empty name"),
    (["sweep", "--output-dir", " "], "argument --output-dir: expected a folder, got an empty name"),
    (["eval", "--output-dir", ""], "argument --output-dir/--output: expected a folder, got an empty name"),
    (["reproduce", "recipes", "--output-dir", ""], "argument --output-dir/--out-dir: expected a folder"),
    (["evl", "--model", "x"], "unknown command 'evl' (did you mean 'eval'?)"),
    (["sweeep"], "unknown command 'sweeep' (did you mean 'sweep'?)"),
    (["frobnicate"], "unknown command 'frobnicate'; commands: prune, eval, sweep, push, reproduce"),
    (["--sparsty", "0.5"], "unrecognized arguments: --sparsty 0.5 (did you mean --sparsity?)"),
    (["eval", "--max-windws", "3", "--tasks", "c4"], "unrecognized arguments: --max-windws 3 (did you mean --max-windows?)"),
    (["push", "a", "b", "--dry-run"], "--dry-run needs --output-dir DIR"),
    (["push", "a", "b", "--output-dir", "x"], "--output-dir goes with --dry-run"),
])
def test_bad_options_are_one_line_exit_2_before_the_model_loads(no_model_load, capsys, argv, message):
    rc = main([*argv, *(QUIET if argv[0] not in ("push", "reproduce", "evl", "sweeep", "frobnicate") else [])])
    assert message in _one_line(capsys.readouterr().err, rc)


def test_a_calibration_tensor_with_zero_rows(no_model_load, token_files, capsys):
    rc = main(["--calib-data", str(token_files / "zero.pt"), "--eval-ppl", "none", *QUIET])
    err = _one_line(capsys.readouterr().err, rc)
    assert "zero.pt holds no calibration windows: its tensor has shape (0, 16)" in err
    with pytest.raises(LLMPruneError, match="nsamples >= 1"):  # the Python API too, at the type that holds them
        from llmprune.calibration import CalibrationData

        CalibrationData(torch.zeros(0, 16, dtype=torch.int64), "tensor")


@pytest.mark.parametrize("option, value, message", [
    ("--seqlen", "32", "--seqlen 32 contradicts the token file"),
    ("--nsamples", "8", "--nsamples 8 contradicts the token file"),
])
def test_a_seqlen_that_contradicts_a_token_file(no_model_load, token_files, capsys, option, value, message):
    rc = main(["--calib-data", str(token_files / "t16.pt"), option, value, *QUIET])
    err = _one_line(capsys.readouterr().err, rc)
    assert message in err and "holds 4 windows of 16 tokens" in err and f"give {option} " in err


def test_a_token_file_sets_the_recorded_shape(tiny_model_dir, token_files, tmp_path):
    """Without --nsamples/--seqlen a token file's own shape is taken, and llmprune.json agrees with itself."""
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--method", "wanda", "--calib-data", str(token_files / "t16.pt"),
                 "--eval-ppl", "none", "--output-dir", str(out), *QUIET]) == 0
    rec = json.loads((out / "llmprune.json").read_text())
    assert rec["calibration"]["nsamples"] == rec["config"]["calibration"]["nsamples"] == 4
    assert rec["calibration"]["seqlen"] == rec["config"]["calibration"]["seqlen"] == 16


def test_the_api_records_the_shape_a_token_file_had():
    from llmprune.calibration import CalibrationData
    from llmprune.calibration.data import as_used
    from llmprune.config import CalibrationConfig

    data = CalibrationData(torch.zeros(4, 16, dtype=torch.int64), "t.pt")
    cfg = as_used(CalibrationConfig(source="t.pt"), data)  # defaults 128 x 2048 do not describe the file
    assert (cfg.nsamples, cfg.seqlen) == (4, 16)
    assert as_used(CalibrationConfig(source="c4", nsamples=4), data).seqlen == 2048  # text: as configured


def test_a_yaml_syntax_error_names_line_and_column(no_model_load, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nprune: {method: wanda\n  sparsity: [0.5\n")
    rc = main(["reproduce", str(bad), "--output-dir", str(tmp_path / "out"), "-q"])
    err = _one_line(capsys.readouterr().err, rc)
    assert f"{bad}, line 3, column 11: not valid YAML: expected ',' or '}}'" in err
    assert "flow mapping that starts at line 2, column 8" in err


def test_a_recipe_with_defaults_but_no_cells(no_model_load, tmp_path, capsys):
    f = tmp_path / "table.yaml"
    f.write_text("defaults:\n  model: x\n  calibration: {nsamples: 4}\n")
    rc = main(["reproduce", str(f), "--output-dir", str(tmp_path / "out"), "-q"])
    assert "has `defaults:` but no `cells:`" in _one_line(capsys.readouterr().err, rc)


# ---------------------------------------------------------------- models that can't be loaded

def _model_error(capsys, model: str, *extra) -> str:
    rc = main(["eval", "--model", model, "--tasks", "wikitext2", *extra, *QUIET])
    line = _one_line(capsys.readouterr().err, rc)
    assert not line.rstrip().endswith((":", ",")), line  # a complete sentence, not cut off
    return line


def test_an_empty_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _model_error(capsys, str(tmp_path / "empty"))
    assert "holds no files" in err and "save_pretrained" in err and "model_type" not in err


def test_a_config_without_model_type(tmp_path, capsys):
    (tmp_path / "nomt").mkdir()
    (tmp_path / "nomt" / "config.json").write_text("{}")
    assert "its config.json names no model_type" in _model_error(capsys, str(tmp_path / "nomt"))


def test_a_folder_with_several_ggufs_and_no_config(tmp_path, capsys):
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.gguf").write_bytes(b"x")
    (d / "b.gguf").write_bytes(b"x")
    assert "holds 2 .gguf files and no config.json; name one file" in _model_error(capsys, str(d))


def test_a_truncated_gguf_is_named(tmp_path, capsys):
    from tiny_gguf import write_tiny_gguf

    whole = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "head.gguf").write_bytes(whole[:300])
    err = _model_error(capsys, str(tmp_path / "cut.gguf"))
    assert f"the GGUF file {tmp_path / 'cut.gguf'} is truncated: its tensors need {len(whole):,} bytes" in err
    err = _model_error(capsys, str(tmp_path / "head.gguf"))
    assert "head.gguf is truncated: its header cannot be read (300 bytes)" in err
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    assert "junk.gguf is not a GGUF file" in _model_error(capsys, str(tmp_path / "junk.gguf"))


def _saved_model(d, tokenizer=True):
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    if tokenizer:
        tok.save_pretrained(d)
    return d


def test_a_tokenizer_that_cannot_be_built(tmp_path, capsys):
    d = _saved_model(tmp_path / "notok", tokenizer=False)
    err = _model_error(capsys, str(d))
    assert "cannot build the tokenizer of model" in err and "has no tokenizer.json" in err
    assert err.endswith("save the model's tokenizer into the folder (tokenizer.save_pretrained) or install what it needs")
    d = _saved_model(tmp_path / "badjson")
    (d / "tokenizer.json").write_text("{not json")
    assert "a tokenizer file is not valid JSON" in _model_error(capsys, str(d))


def test_a_config_field_of_the_wrong_type(tmp_path, capsys):
    d = _saved_model(tmp_path / "badcfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    (d / "config.json").write_text(json.dumps(cfg))
    err = _model_error(capsys, str(d))
    assert "a config.json field has the wrong type: Field 'num_hidden_layers' expected int, got str" in err
    assert err.endswith(f"correct it in {d / 'config.json'}")


def test_an_eval_seqlen_beyond_the_context_is_refused_before_any_work(tiny_model_dir, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("evaluated before the window was checked")

    monkeypatch.setattr(pipeline, "evaluate_ppl", no_work)
    monkeypatch.setattr("llmprune.evaluation.harness.evaluate", no_work)
    for argv in (["eval", "--seqlen", "4096"], ["eval", "--eval-seqlen", "4096", "--tasks", "c4,boolq"],
                 ["--method", "magnitude", "--eval-seqlen", "4096"]):
        rc = main([*argv, "--model", str(tiny_model_dir), *QUIET])
        err = _one_line(capsys.readouterr().err, rc)
        assert ("--eval-seqlen 4096 is longer than the model's context of 2048 tokens (max_position_embeddings); "
                "give --eval-seqlen 2048 or less") in err


def test_the_context_comes_from_the_config_else_the_tokenizer_and_no_limit_is_no_refusal():
    from llmprune.models import check_context, context_length

    gpt2 = tiny_model("gpt2")
    assert context_length(gpt2) == (64, "max_position_embeddings")  # GPT-2's n_positions, by its attribute map
    nolimit = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=8))
    assert context_length(nolimit, types.SimpleNamespace(model_max_length=int(1e30))) is None
    check_context(nolimit, None, 10**6, "--eval-seqlen")  # a model that records no limit is never refused
    assert context_length(nolimit, types.SimpleNamespace(model_max_length=512)) == (512, "the tokenizer's model_max_length")
    with pytest.raises(LLMPruneError, match="--seqlen 65 is longer than the model's context of 64 tokens"):
        check_context(gpt2, None, 65, "--seqlen")


def test_zero_limits_are_refused_in_the_library_too():
    from llmprune.evaluation.harness import check_eval_counts, split_tasks
    from llmprune.evaluation.perplexity import perplexity

    with pytest.raises(LLMPruneError, match="--limit must be a positive number"):
        check_eval_counts(limit=0)
    with pytest.raises(LLMPruneError, match="max_windows must be at least 1, got 0"):
        perplexity(tiny_model(), torch.zeros(64, dtype=torch.int64), 16, max_windows=0)
    with pytest.raises(LLMPruneError, match="no task given"):
        split_tasks([])


# ---------------------------------------------------------------- an unexpected error: one line naming the step

def _pruning_run(model_dir, *extra):
    return main(["--model", str(model_dir), "--method", "magnitude", "--eval-ppl", "none", *QUIET, *extra])


def test_an_unexpected_error_is_one_line_naming_the_step(tiny_model_dir, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyError("q_proj")

    monkeypatch.setattr(pipeline, "prune", boom)
    rc = _pruning_run(tiny_model_dir)
    err = _one_line(capsys.readouterr().err, rc, code=1)
    assert err == "llmprune: error: pruning: KeyError: 'q_proj' (run with --debug for the traceback)"


def test_debug_prints_the_traceback_then_the_line(tiny_model_dir, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyError("q_proj")

    monkeypatch.setattr(pipeline, "prune", boom)
    assert _pruning_run(tiny_model_dir, "--debug") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "llmprune: error: pruning: KeyError: 'q_proj'"
    monkeypatch.setenv("LLMPRUNE_DEBUG", "1")
    assert _pruning_run(tiny_model_dir) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_the_step_names_the_block(tiny_model_dir, token_files, monkeypatch, capsys, method):
    import llmprune.pruner as pruner

    calls = []
    real = pruner._prune_block

    def second_block_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(16x32 and 64x32)")
        return real(*a, **k)

    monkeypatch.setattr(pruner, "_prune_block", second_block_fails)
    rc = main(["--model", str(tiny_model_dir), "--method", method, "--calib-data", str(token_files / "t16.pt"),
               "--eval-ppl", "none", *QUIET])
    err = _one_line(capsys.readouterr().err, rc, code=1)
    assert err.startswith("llmprune: error: pruning, block 2/2: RuntimeError: mat1 and mat2 shapes cannot be "
                          "multiplied (16x32 and 64x32)")


def test_an_unexpected_error_while_loading_names_that_step(tiny_model_dir, monkeypatch, capsys):
    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(pipeline, "load_model", broken)
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", *QUIET])
    assert _one_line(capsys.readouterr().err, rc, code=1).startswith(
        "llmprune: error: loading the model: AttributeError: 'NoneType' object has no attribute 'shape'")


def test_steps_nest_and_leave_user_errors_alone():
    assert current_step() is None
    with pytest.raises(KeyError) as info:
        with step():
            set_step("pruning")
            with step("scoring"):
                step_detail("block 3/30")
                assert current_step() == "pruning, scoring, block 3/30"
                raise KeyError("x")
    assert failed_step(info.value) == "pruning, scoring, block 3/30" and current_step() is None
    with pytest.raises(LLMPruneError) as info:
        with step("loading the model"):
            raise LLMPruneError("bad input")
    assert failed_step(info.value) is None  # a user's error says what to do already
    set_step("outside")  # no open step: nothing to name, nothing fails
    assert current_step() is None


def test_summary_joins_lines_and_never_stops_mid_word():
    e = ValueError("Couldn't do it from one of:\n(1) a file,\n(2) a thing.\nInstall sentencepiece.")
    assert summary(e) == "Couldn't do it from one of: (1) a file, (2) a thing. Install sentencepiece."
    long = ValueError("First sentence here. " + "word " * 100)
    assert summary(long) == "First sentence here."
    assert summary(KeyError()) == "KeyError"
    assert summary(ValueError("word " * 100)) == ("word " * 60).strip() + " ..."  # no sentence end: marked as cut


# ---------------------------------------------------------------- one command line

def test_top_level_help_lists_every_command_in_one_line(capsys):
    for argv in (["--help"], ["-h"], ["help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        for cmd in cli.SUBCOMMANDS:
            assert re.search(rf"^  {cmd} +\S.+$", out, re.M), (cmd, out)
        assert "Options alone run prune" in out and "--version" in out


def test_help_of_a_command(capsys):
    assert main(["help", "eval"]) == 0
    assert "usage: python -m llmprune eval" in capsys.readouterr().out
    assert main(["sweep", "--help"]) == 0
    assert "The defaults are a first look" in " ".join(capsys.readouterr().out.split())


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmprune {version('llmprune')}"


PARSERS = {"prune": cli.build_prune_parser, "eval": cli.build_eval_parser, "sweep": cli.build_sweep_parser,
           "push": cli.build_push_parser, "reproduce": cli.build_reproduce_parser}


@pytest.mark.parametrize("name", PARSERS)
def test_every_option_is_documented_with_its_default(name):
    parser = PARSERS[name]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, type(parser._actions[0])):  # -h
            continue
        text = formatter._get_help_string(action)
        assert action.help, f"{name} {action.option_strings} has no help"
        if action.nargs != 0:  # flags are off unless given
            assert "default" in text, f"{name} {action.option_strings}: {text}"


def test_sweep_defaults_are_a_first_try():
    a = cli.build_sweep_parser().parse_args([])
    assert a.methods == ("magnitude", "wanda") and a.sparsities == ("0.3", "0.5", "0.7")
    assert a.patterns == ("unstructured",) and a.eval_max_windows == 32
    assert cli._calibration_shape("c4", a.nsamples, a.seqlen, 32, 512) == (32, 512)
    assert cli.build_sweep_parser().parse_args(["--eval-max-windows", "all"]).eval_max_windows is None


def test_evaluation_options_have_the_same_names_on_prune_eval_and_sweep():
    spellings = {"eval": [["--eval-seqlen", "64"], ["--seqlen", "64"]],
                 "prune": [["--eval-seqlen", "64"]], "sweep": [["--eval-seqlen", "64"]]}
    for name, variants in spellings.items():
        for argv in variants:
            assert PARSERS[name]().parse_args(argv).eval_seqlen == 64, (name, argv)
    for name in ("prune", "eval", "sweep"):
        for opt in ("--eval-max-windows", "--max-windows"):
            assert PARSERS[name]().parse_args([opt, "7"]).eval_max_windows == 7, (name, opt)
        for opt in ("--tasks", "--eval"):
            assert PARSERS[name]().parse_args([opt, "wikitext2,boolq"]).tasks == ("wikitext2", "boolq")
    assert cli.build_prune_parser().parse_args(["--seqlen", "64"]).seqlen == 64  # prune's: calibration
    assert cli.build_eval_parser().parse_args(["--eval-batch-size", "4"]).batch_size == 4


@pytest.mark.parametrize("parser, argv, new", [
    ("eval", ["--output", "res"], "--output-dir"),
    ("reproduce", ["recipes", "--out-dir", "res"], "--output-dir"),
])
def test_old_output_spellings_still_work_with_a_warning(parser, argv, new):
    a = PARSERS[parser]().parse_args(argv)
    assert a.output_dir == "res"
    assert a._deprecations == [f"warning: {argv[-2]} is deprecated and goes in the next release; use {new}"]
    assert not hasattr(PARSERS[parser]().parse_args([*argv[:-2], new, "res"]), "_deprecations")


def test_eval_output_alias_end_to_end_warns_once(tiny_model_dir, tmp_path, caplog):
    from conftest import data_dir

    out = tmp_path / "res"
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext", "--seqlen", "32", "--max-windows",
                 "2", "--data-dir", str(data_dir()), "--output", str(out), *QUIET]) == 0
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == ["warning: --output is deprecated and goes in the next release; use --output-dir"]
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]["perplexity"]) == ["wikitext2"]  # lm-eval's name, our task


def test_push_dry_run_new_and_old_spelling(tiny_model_dir, tmp_path, caplog):
    new, old = tmp_path / "staged-new", tmp_path / "staged-old"
    assert main(["push", str(tiny_model_dir), "me/tiny", "--dry-run", "--output-dir", str(new), "-q"]) == 0
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert main(["push", str(tiny_model_dir), "me/tiny", "--dry-run", str(old), "-q"]) == 0
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "warning: --dry-run DIR is deprecated and goes in the next release; use --dry-run --output-dir DIR"]
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())


def test_a_real_process_prints_the_warning_and_the_one_line(tmp_path):
    """Outside pytest's log capture: python -m llmprune writes the deprecation warning and the error on stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.yaml"
    bad.write_text("cells: [\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "llmprune", "reproduce", str(bad), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "warning: --out-dir is deprecated and goes in the next release; use --output-dir",
        f"llmprune: error: {bad}, line 2, column 1: not valid YAML: expected the node content, but found "
        "'<stream end>' (while parsing a flow node that starts at line 2, column 1)"], r.stderr


def test_lm_eval_task_names_are_aliases():
    from llmprune.evaluation.harness import split_tasks

    assert split_tasks(["wikitext", "LAMBADA_OPENAI", "arc_easy", "wikitext2"]) == (["wikitext2"], ["lambada", "arc_easy"])
    with pytest.raises(LLMPruneError, match="did you mean 'wikitext2'"):
        split_tasks(["wikitxt2"])


@pytest.mark.parametrize("method", [["--method", "block-influence", "--drop-blocks", "1"], ["--method", "wanda"]])
def test_a_token_file_longer_than_the_context_is_refused_before_any_work(method, tmp_path, monkeypatch, capsys):
    """Block removal and weight methods alike: the file's own windows are checked right after loading."""
    tok = tiny_tokenizer()
    d = tmp_path / "gpt2"
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(d)  # a context of 64 positions
    tok.save_pretrained(d)
    f = tmp_path / "long.pt"
    torch.save(torch.randint(0, len(tok), (2, 128)), f)

    def no_work(*a, **k):
        raise AssertionError("pruned or evaluated before the windows were checked")

    monkeypatch.setattr(pipeline, "evaluate_ppl", no_work)
    monkeypatch.setattr(pipeline, "prune", no_work)
    monkeypatch.setattr("llmprune.blocks.prune_blocks", no_work)
    rc = main(["--model", str(d), *method, "--calib-data", str(f), "--eval-ppl", "none", "--output-dir",
               str(tmp_path / "out"), *QUIET])
    err = _one_line(capsys.readouterr().err, rc)
    assert ("the token file long.pt (used as given) has windows of 128 tokens, longer than the model's context of "
            "64 tokens") in err and "cut its windows to 64 tokens or less" in err
    assert not (tmp_path / "out").exists()
