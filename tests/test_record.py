"""The job record: the typed JobRecord that run_prune_job returns is llmprune.json key for key (the keys and
their order as before it was typed), reads back from older files that lack newer keys, keeps keys it does not
know, and is what the card, the CLI summary, `push` and `reproduce` read."""

import dataclasses
import json

import pytest
import yaml

from llmprune.cli import format_summary
from llmprune.config import CalibrationConfig, PruneConfig
from llmprune.export import make_model_card, read_record, reproduce_command
from llmprune.pipeline import run_prune_job
from llmprune.record import BlockRecord, JobRecord, Perplexity, Resolved, Zeros

# The keys of llmprune.json before the record was typed (a magnitude job saved with --base-model): top level and
# the parts the record types, in the file's order.
TOP_KEYS = ["model", "model_kind", "base_model", "license", "architecture", "config", "calibration", "seed",
            "versions", "device", "gguf", "blocks", "sparsity", "model_sparsity", "zeros_before", "zeros_after",
            "resolved", "layer_sparsity", "timings", "block_timings", "peak_memory", "perplexity", "evaluation"]
CONFIG_KEYS = ["prune", "blocks", "calibration", "eval", "dtype", "save_dtype"]
ZERO_KEYS = ["block_linear", "model", "block_linear_zeros", "block_linear_params", "model_zeros", "model_params"]

# An llmprune.json written before model_kind, license, save_dtype, model_sparsity, zeros_*, resolved and gguf
OLD = {"model": "/home/someone/models/tiny-llama", "architecture": "LlamaForCausalLM",
       "config": {"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured", "ria_alpha": 0.5,
                            "sparsegpt_blocksize": 128, "sparsegpt_percdamp": 0.01},
                  "blocks": None, "calibration": {"source": "c4", "nsamples": 2, "seqlen": 16, "seed": 0},
                  "eval": {"datasets": ["wikitext2"], "seqlen": 16}, "dtype": "float32"},
       "calibration": {"source": "c4", "description": "C4", "nsamples": 2, "seqlen": 16, "token_sha256": "ab" * 32},
       "seed": 0, "versions": {"torch": "2.0"}, "device": "cpu", "blocks": None, "sparsity": 0.5,
       "layer_sparsity": {}, "timings": {"prune_total": 1.0, "load_model": 2.0}, "block_timings": [],
       "peak_memory": None, "perplexity": {"dense": {"wikitext2": {"ppl": 9.0, "seqlen": 16, "windows": 2}},
                                           "pruned": {"wikitext2": {"ppl": 10.0, "seqlen": 16, "windows": 2}}},
       "evaluation": None}


def test_saved_llmprune_json_keeps_its_keys_and_reads_back_exactly(tmp_path, tiny_model_dir):
    out = tmp_path / "pruned"
    rec = run_prune_job(str(tiny_model_dir), PruneConfig(method="magnitude", sparsity=0.5, device="cpu"),
                        CalibrationConfig(), None, output_dir=str(out), base_model="org/tiny", license="mit")
    assert isinstance(rec, JobRecord) and rec.output_dir == str(out)
    text = (out / "llmprune.json").read_text()
    saved = json.loads(text)
    assert list(saved) == TOP_KEYS
    assert list(saved["config"]) == CONFIG_KEYS and list(saved["zeros_after"]) == ZERO_KEYS
    assert saved["resolved"] == {"comparison_group": "per-layer", "selection_rule": "exact-k", "data_dir": {}}  # only what applies
    assert saved["calibration"] is None and saved["blocks"] is None  # magnitude: no calibration, no blocks
    back = JobRecord.from_dict(saved)
    assert json.dumps(back.to_dict(), indent=2) + "\n" == text  # the same file, byte for byte, key order included
    assert rec.to_dict() == {**saved, "output_dir": str(out)}  # the returned record is the file, plus its folder
    assert read_record(out) == back
    assert rec.zeros_after.block_linear == rec.sparsity == 0.5 and rec.resolved.comparison_group == "per-layer"
    assert rec.license == {"license": "mit", "from": "--license"} and rec.base_model == "org/tiny"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.sparsity = 0.1


def test_an_older_file_without_the_newer_keys_loads_and_is_read_by_card_summary_and_command():
    rec = JobRecord.from_dict(OLD)
    assert rec.model_kind is None and rec.license is None and rec.zeros_before is None and rec.gguf is None
    assert rec.config.save_dtype is None and rec.resolved == Resolved() and rec.calibration.nsamples == 2
    assert json.dumps(rec.to_dict()) == json.dumps(OLD)  # written back: the same keys, no newer ones invented
    card = make_model_card(OLD).text
    assert "| measured sparsity (blocks' linear layers) | 50.00 % |" in card and "`float32`" in card
    assert "zeros in the whole model" not in card  # not recorded then: not claimed
    cmd = reproduce_command(OLD, output_dir="out")
    assert "--model tiny-llama" in cmd and "--save-dtype" not in cmd and "--dtype float32" in cmd
    summary = format_summary(OLD)
    assert "-> 50.00 % of block linear weights are zero" in summary and "of all parameters" not in summary
    assert "wikitext2 perplexity (seqlen 16, 2 windows): dense 9.000 -> pruned 10.000" in summary
    assert make_model_card(rec).text == card  # a dict or the record: the same card


def test_unknown_keys_survive_a_round_trip_after_the_known_ones():
    data = {**OLD, "future_key": [1, 2], "resolved": {"data_dir": {"eval": "hub"}, "new_rule": "x"},
            "zeros_after": {**dict.fromkeys(ZERO_KEYS, 0), "by_layer": {"q": 0}}}
    rec = JobRecord.from_dict(data)
    assert rec.extra == {"future_key": [1, 2]} and rec.resolved.extra == {"new_rule": "x"}
    assert rec.zeros_after.extra == {"by_layer": {"q": 0}}
    again = rec.to_dict()
    assert again["future_key"] == [1, 2] and list(again)[-1] == "future_key"
    assert again["resolved"] == {"data_dir": {"eval": "hub"}, "new_rule": "x"}
    assert JobRecord.from_dict(again) == rec


def test_parts_are_built_from_the_dicts_other_rooms_return():
    rec = JobRecord(zeros_after=dict.fromkeys(ZERO_KEYS, 1), blocks={"removed": [2], "num_blocks_before": 4},
                    resolved={"comparison_group": "per-row", "data_dir": {}}, perplexity=None)
    assert isinstance(rec.zeros_after, Zeros) and rec.zeros_after.model_params == 1
    assert isinstance(rec.blocks, BlockRecord) and rec.blocks.removed == [2] and rec.blocks.num_blocks_after is None
    assert rec.perplexity == Perplexity() and rec.resolved.comparison_group == "per-row"
    with pytest.raises(TypeError, match="mapping"):
        JobRecord.from_dict([("model", "x")])


def test_reproduce_reads_a_job_record_by_attribute(tmp_path):
    from llmprune.reproduce import reproduce

    table = tmp_path / "table"
    table.mkdir()
    cell = {"name": "tiny", "model": str(tmp_path), "prune": {"method": "wanda", "sparsity": 0.5},
            "calibration": {"source": "c4", "nsamples": 2, "seqlen": 16}, "eval": {"datasets": ["wikitext2"]},
            "paper": {"value": 10.0, "metric": "wikitext2_ppl", "source": "a test", "tolerance": 0.5}}
    (table / "01.yaml").write_text(yaml.safe_dump(cell))

    def runner(recipe):
        return JobRecord(model="tiny", perplexity=Perplexity(pruned={"wikitext2": {"ppl": 10.25}}))

    out = reproduce(table, out_dir=tmp_path / "out", runner=runner)
    (got,) = out["cells"]
    assert got["status"] == "ok" and got["ours"] == 10.25 and got["within"] is True
    assert got["record"]["perplexity"] == {"dense": None, "pruned": {"wikitext2": {"ppl": 10.25}}}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["cells"][0]["record"]["model"] == "tiny"
