"""The CLI's sharing paths: card in every output folder, push (dry run, fake Hub), --push-to-hub, reproduce."""

import json

import pytest
from huggingface_hub import ModelCard

from llmprune.cli import main

from conftest import data_dir


def _prune(model_dir, out, *extra):
    return main(["--model", str(model_dir), "--method", "wanda", "--nsamples", "4", "--seqlen", "32",
                 "--data-dir", str(data_dir()), "--eval-max-windows", "2", "--output-dir", str(out), "-q", *extra])


class FakeApi:
    def __init__(self, *a, **k):
        self.calls = []
        FakeApi.last = self

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return f"https://huggingface.co/{kw['repo_id']}/commit/abc"


def test_every_output_folder_has_a_model_card_and_push_dry_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _prune(tiny_model_dir, out) == 0
    card = ModelCard.load(out / "README.md")
    assert "pruned" in card.data.tags and "wanda" in card.data.tags
    dry = tmp_path / "dry"
    assert main(["push", str(out), "me/tiny-wanda", "--dry-run", str(dry), "-q"]) == 0
    assert (dry / "README.md").is_file() and (dry / "model.safetensors").is_file()
    assert "dry run" in capsys.readouterr().out


def test_push_to_hub_uploads_one_commit_with_a_fake_api(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_for_tests")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pruned"
    assert _prune(tiny_model_dir, out, "--push-to-hub", "me/tiny-wanda", "--private") == 0
    uploads = [c for c in FakeApi.last.calls if c[0] == "upload_folder"]
    assert len(uploads) == 1 and uploads[0][1] == "me/tiny-wanda"
    assert [c for c in FakeApi.last.calls if c[0] == "create_repo"][0][2].get("private") is True
    assert "pushed:" in capsys.readouterr().out
    for f in out.iterdir():
        if f.suffix in (".json", ".md"):
            assert "hf_secret_token_for_tests" not in f.read_text()


def test_push_to_hub_without_token_fails_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    out = tmp_path / "pruned"
    assert _prune(tiny_model_dir, out, "--push-to-hub", "me/x") == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not out.exists()


def test_reproduce_runs_local_cells_and_skips_unreachable_ones(tiny_model_dir, tmp_path, capsys):
    table = tmp_path / "table.yaml"
    table.write_text(json.dumps({
        "title": "tiny",
        "defaults": {"calibration": {"source": "c4", "nsamples": 4, "seqlen": 32, "data_dir": str(data_dir())},
                     "eval": {"datasets": ["wikitext2"], "seqlen": 32, "max_windows": 2, "data_dir": str(data_dir())}},
        "cells": [
            {"name": "tiny_wanda", "model": str(tiny_model_dir), "prune": {"method": "wanda", "sparsity": 0.5}},
            {"name": "hub_cell", "model": "meta-llama/Llama-2-7b-hf", "prune": {"method": "wanda", "sparsity": 0.5},
             "paper": {"value": 6.42, "metric": "wikitext2_ppl", "source": "Wanda README", "tolerance": 0.03}},
        ]}))
    out = tmp_path / "rep"
    assert main(["reproduce", str(table), "--out-dir", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    status = {c["name"]: c["status"] for c in res["cells"]}
    assert status["tiny_wanda"] == "ok" and status["hub_cell"] == "skipped"
    assert (out / "comparison.md").read_text().count("|") > 4
