"""The engine's four registered parts: a newcomer's scorer with an option (one class + one registration line)
through the CLI, recipes, llmprune.json and the card; a new statistic; an allocation with a dense pre-pass;
the target interface; the old flat option keys."""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass, field

import pytest
import torch
import yaml

import llmprune
from llmprune.allocation import ALLOCATIONS, Allocation, UnitRef, register_allocation
from llmprune.calibration import observe
from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.masks import Pattern
from llmprune.models import find_blocks, linear_layers, weight_oi
from llmprune.scorers import SCORERS, Scorer, register_scorer
from llmprune.scorers.wanda import Wanda
from llmprune.stats import COLLECTORS, LayerStats, register_collector
from llmprune.targets import TARGETS, MaskTarget, Target, register_target

from conftest import calib_tokens, data_dir, tiny_model


@pytest.fixture
def toy():
    """A scorer with one option, registered from this file: S_ij = |W_ij| * ||X_j||_2 ** power (power 1: Wanda)."""
    seen = []

    @dataclass(frozen=True)
    class ToyOptions:
        power: float = field(default=2.0, metadata={"help": "exponent of the input norm", "label": "toy power"})

        def __post_init__(self):
            if self.power < 0:
                raise LLMPruneError(f"toy_power must be >= 0, got {self.power}")

    @register_scorer("toy")
    class Toy(Scorer):
        needs = ("sqnorm",)
        Options = ToyOptions

        def score(self, weight, stats):
            seen.append(self.options.power)
            return weight.abs().float() * stats.sqnorm.sqrt().pow(self.options.power).unsqueeze(0)

    try:
        yield seen
    finally:
        SCORERS.unregister("toy")


def _masks(model):
    return {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() == 2}


def test_a_scorer_with_an_option_prunes_as_its_math_says(toy):
    tokens = calib_tokens()
    a, b = tiny_model("llama"), tiny_model("llama")
    llmprune.prune(a, PruneConfig(method="toy", sparsity=0.5, options={"power": 1.0}), tokens)
    llmprune.prune(b, PruneConfig(method="wanda", sparsity=0.5), tokens)
    assert set(toy) == {1.0}
    ma, mb = _masks(a), _masks(b)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)  # power 1 is Wanda's score: the same masks
    c = tiny_model("llama")
    llmprune.prune(c, PruneConfig(method="toy", sparsity=0.5, toy_power=4.0), tokens)  # the flat key
    assert toy[-1] == 4.0 and any(not torch.equal(_masks(c)[n], mb[n]) for n in mb)


def test_a_scorer_option_through_cli_recipe_record_and_card(toy, tiny_model_dir, tmp_path):
    from llmprune.cli import build_prune_parser, main
    from llmprune.export import reproduce_command
    from llmprune.recipe import Recipe

    p = build_prune_parser()
    assert "--toy-power" in p.format_help() and "exponent of the input norm" in p.format_help()
    assert p.parse_args(["--method", "toy", "--toy-power", "3"]).toy_power == 3.0
    assert p.parse_args([]).toy_power == 2.0

    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--method", "toy", "--toy-power", "3", "--calib-data", "c4",
                 "--data-dir", str(data_dir()), "--nsamples", "2", "--seqlen", "16", "--eval-ppl", "none",
                 "--device", "cpu", "-q", "--output-dir", str(out)]) == 0
    assert toy and set(toy) == {3.0}  # the flag reached the scorer
    rec = json.loads((out / "llmprune.json").read_text())
    assert rec["config"]["prune"]["options"] == {"power": 3.0}
    assert rec["sparsity"] == pytest.approx(0.5)
    cmd = reproduce_command(rec)
    assert "--toy-power 3.0" in cmd
    argv = shlex.split(cmd)[3:]
    assert p.parse_args(argv).toy_power == 3.0
    from llmprune.export import make_model_card

    assert "| toy power | 3 |" in make_model_card(rec).text  # the card's row, labelled by the field's metadata

    cell = {"name": "toy_cell", "prune": {"method": "toy", "sparsity": 0.5, "toy_power": 3}}
    r = Recipe.from_dict(cell)
    assert r.prune.options.power == 3.0 and isinstance(r.prune.options.power, float)
    assert Recipe.from_dict({"name": "t", "prune": {"method": "toy", "options": {"power": 3.0}}}).prune == \
        PruneConfig(method="toy", toy_power=3.0)
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))) == r
    with pytest.raises(LLMPruneError, match=r"unknown key\(s\) toy_powr"):
        Recipe.from_dict({"name": "t", "prune": {"method": "toy", "toy_powr": 3}})
    with pytest.raises(LLMPruneError, match=r"unknown option 'powr' \(did you mean 'power'\?\)"):
        Recipe.from_dict({"name": "t", "prune": {"method": "toy", "options": {"powr": 3}}})
    with pytest.raises(LLMPruneError, match=r"toy_power must be a float, got 'high'"):
        Recipe.from_dict({"name": "t", "prune": {"method": "toy", "toy_power": "high"}})
    with pytest.raises(LLMPruneError, match=r"toy_power must be >= 0"):
        Recipe.from_dict({"name": "t", "prune": {"method": "toy", "toy_power": -1}})


def test_flag_and_key_are_gone_when_the_scorer_is():
    from llmprune.cli import build_prune_parser

    assert "toy" not in SCORERS
    assert "--toy-power" not in build_prune_parser().format_help()
    with pytest.raises(TypeError, match="toy_power"):
        PruneConfig(method="wanda", toy_power=3.0)


def test_old_flat_keys_and_records_still_load(caplog):
    old = {"method": "ria", "sparsity": 0.5, "pattern": "unstructured", "comparison_group": None, "ria_alpha": 0.25,
           "sparsegpt_blocksize": 128, "sparsegpt_percdamp": 0.01, "device": "auto", "batch_size": None,
           "offload_activations": "auto"}  # llmprune.json of an earlier version
    cfg = PruneConfig.from_dict(old)
    assert cfg == PruneConfig(method="ria", sparsity=0.5, options={"alpha": 0.25})
    assert cfg.ria_alpha == 0.25 and cfg.sparsegpt_blocksize == 128 and cfg.options.alpha == 0.25
    assert cfg.to_dict()["options"] == {"alpha": 0.25} and "ria_alpha" not in cfg.to_dict()
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    sg = PruneConfig(method="sparsegpt", pattern="2:4", sparsegpt_blocksize=64)
    assert (sg.options.blocksize, sg.options.percdamp) == (64, 0.01)
    with pytest.raises(LLMPruneError, match="sparsegpt_blocksize 6 must be a multiple of M=4"):
        PruneConfig(method="sparsegpt", pattern="2:4", sparsegpt_blocksize=6)
    with pytest.raises(LLMPruneError, match="given twice"):
        PruneConfig(method="ria", ria_alpha=0.1, options={"alpha": 0.2})
    with caplog.at_level(logging.WARNING, logger="llmprune.config"):
        w = PruneConfig(method="wanda", ria_alpha=0.3)  # another method's option: ignored, as before
    assert "ria_alpha is an option of method ria: ignored for method wanda" in caplog.text
    assert w.ria_alpha == 0.5 and w == PruneConfig(method="wanda")
    with pytest.raises(LLMPruneError, match="ria_alpha must be >= 0"):  # still validated
        PruneConfig(method="wanda", ria_alpha=-1.0)
    with pytest.raises(LLMPruneError, match="not the options of method 'sparsegpt'"):
        PruneConfig(method="sparsegpt", options=cfg.options)


def test_cli_flags_of_the_method_and_of_another_method(caplog):
    from llmprune.cli import _method_options, build_prune_parser
    from llmprune.options import options_from_args

    p = build_prune_parser()
    a = p.parse_args(["--method", "sparsegpt", "--sparsegpt-blocksize", "64", "--ria-alpha", "0.5"])
    kw = options_from_args(a, a.method, _method_options())
    assert kw == {"options": {"blocksize": 64, "percdamp": 0.01}}  # ria's flag at its default: not passed on
    a = p.parse_args(["--method", "wanda", "--sparsegpt-percdamp", "0.1"])
    with caplog.at_level(logging.WARNING, logger="llmprune.config"):
        PruneConfig(method="wanda", **options_from_args(a, a.method, _method_options()))
    assert "sparsegpt_percdamp is an option of method sparsegpt: ignored" in caplog.text


def test_unknown_statistic_fails_at_registration_with_did_you_mean():
    class Bad(Scorer):
        needs = ("sqnrom",)

    with pytest.raises(LLMPruneError, match=r"method 'bad' needs unknown statistic 'sqnrom' \(did you mean "
                                            r"'sqnorm'\?\); known: hessian, sqnorm"):
        register_scorer("bad")(Bad)
    assert "bad" not in SCORERS

    class Old(Wanda):
        needs = "sqnorm"  # the older single string still works

    try:
        register_scorer("_old")(Old)
        assert SCORERS.get("_old").needs == ("sqnorm",) and SCORERS.get("_old").needs_calibration()
    finally:
        SCORERS.unregister("_old")
    assert not SCORERS.get("magnitude").needs_calibration()


def test_options_must_be_a_frozen_dataclass_of_known_types():
    @dataclass
    class Loose:
        x: float = 1.0

    @dataclass(frozen=True)
    class Listy:
        xs: list = field(default_factory=list)

    for opts, msg in ((Loose, "must be frozen"), (Listy, "not one of bool, int, float, str")):
        cls = type("S", (Scorer,), {"Options": opts})
        with pytest.raises(TypeError, match=msg):
            register_scorer("_bad_opts")(cls)
        assert "_bad_opts" not in SCORERS


def test_a_new_statistic_accumulates_through_observe():
    @register_collector("_abssum")
    class AbsSum:
        needs_pass = "forward"

        def accumulate(self, total, x):
            s = x.abs().sum(0, dtype=torch.float32)
            return s if total is None else total.add_(s)

    try:
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        xs = [torch.randn(2, 4, 6) for _ in range(3)]
        with observe(block, linear_layers(block), ("_abssum", "sqnorm")) as stats:
            for x in xs:
                block(x)
        x = torch.cat(xs).reshape(-1, 6)
        torch.testing.assert_close(stats["0"]["_abssum"], x.abs().sum(0))
        torch.testing.assert_close(stats["0"].sqnorm, x.square().sum(0))
        h = torch.relu(block[0](x))
        torch.testing.assert_close(stats["2"]["_abssum"], h.abs().sum(0))
        assert stats["0"].ntokens == 24 and stats["0"].nsamples == 6
        with pytest.raises(LLMPruneError, match="statistic 'hessian' was not collected"):
            stats["0"]["hessian"]
    finally:
        COLLECTORS.unregister("_abssum")


def test_a_layer_that_sees_no_input_fails_loudly():
    model = tiny_model("llama")
    find_blocks(model).modules[1].mlp.unused = torch.nn.Linear(32, 32)  # a linear layer the forward never calls
    with pytest.raises(LLMPruneError, match=r"model\.layers\.1\.mlp\.unused saw no calibration input"):
        llmprune.prune(model, PruneConfig(method="wanda", device="cpu"), calib_tokens())
    from llmprune.stats import require_stats

    with pytest.raises(LLMPruneError, match=r"blk\.a saw no calibration input"):
        require_stats({"a": LayerStats()}, ["a"], ("sqnorm",), "blk", "wanda")  # a LayerStats that saw 0 tokens


def test_an_allocation_with_a_dense_prepass_plans_each_layer():
    seen = {}

    @register_allocation("_busiest-lighter")
    class BusiestLighter(Allocation):
        """In each block, the layer whose inputs carry the most energy is pruned to 25 %, the others to the target."""

        prepass = ("sqnorm",)

        def summarize(self, block, weights, stats):
            seen[block] = {n: stats[n].sqnorm.clone() for n in weights}
            return {n: float(stats[n].sqnorm.sum()) for n in weights}

        def plan(self, target, units, summary):
            plan = {}
            for b in {u.block for u in units}:
                mine = [u for u in units if u.block == b]
                busiest = max(mine, key=lambda u: summary[(b, u.name)]).name
                plan.update({(b, u.name): Pattern.parse("unstructured", 0.25) if u.name == busiest else target
                             for u in mine})
            self.busiest = busiest
            return plan

    try:
        model, dense = tiny_model("llama"), tiny_model("llama")
        tokens = calib_tokens()
        cfg = PruneConfig(method="magnitude", sparsity=0.5, allocation="_busiest-lighter", device="cpu")
        assert cfg.needs_calibration and cfg.to_dict()["allocation"] == "_busiest-lighter"
        rep = llmprune.prune(model, cfg, tokens)
        # the pre-pass saw the dense model: block 1's inputs equal the dense block 0's outputs
        got = {}
        blocks = find_blocks(dense)
        q = blocks.modules[1].self_attn.q_proj
        h = q.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].reshape(-1, 32)))
        with torch.no_grad():
            dense(input_ids=tokens, use_cache=False)
        h.remove()
        torch.testing.assert_close(seen[1]["self_attn.q_proj"], got["x"].square().sum(0), rtol=1e-5, atol=1e-5)
        for b in (0, 1):
            energy = {n: float(s.sum()) for n, s in seen[b].items()}
            busiest = max(energy, key=energy.get)
            for name in energy:
                want = 0.25 if name == busiest else 0.5
                assert rep.layer_sparsity[f"model.layers.{b}.{name}"] == pytest.approx(want, abs=1e-9), name
        with pytest.raises(LLMPruneError, match="needs calibration data"):
            llmprune.prune(tiny_model("llama"), cfg)
    finally:
        ALLOCATIONS.unregister("_busiest-lighter")


def test_uniform_allocation_and_mask_target_units():
    model = tiny_model("llama")
    block = find_blocks(model).modules[0]
    units = MaskTarget().units(block, model.config)
    assert [u.name for u in units] == list(linear_layers(block))
    assert all(u.kind == "weight" and u.layers == (u.name,) and u.dims == (None,) for u in units)
    assert units[0].size == weight_oi(linear_layers(block)[units[0].name]).numel()
    refs = [UnitRef(0, u.name, u.size) for u in units]
    p = Pattern.parse("2:4", None)
    assert ALLOCATIONS.get("uniform")().plan(p, refs, None) == {(0, u.name): p for u in units}
    assert TARGETS.names() == ["mask"] and not MaskTarget.changes_shape


def test_a_target_of_other_units_is_refused_for_a_weight_scorer():
    @register_target("_channels")
    class Channels(Target):
        unit_kind = "channel"
        changes_shape = True

    try:
        with pytest.raises(LLMPruneError, match="method wanda decides on weight units; target _channels removes "
                                                "channel units"):
            PruneConfig(method="wanda", target="_channels")
    finally:
        TARGETS.unregister("_channels")
    with pytest.raises(LLMPruneError, match=r"unknown target 'maks' \(did you mean 'mask'\?\)"):
        PruneConfig(target="maks")
    with pytest.raises(LLMPruneError, match=r"unknown allocation 'uniforn' \(did you mean 'uniform'\?\)"):
        PruneConfig(allocation="uniforn")


def test_sparsegpt_lazy_blocks_use_the_masks_room_in_either_layout():
    from llmprune.masks import unstructured_mask

    g = torch.Generator().manual_seed(3)
    s = torch.randperm(6 * 10, generator=g).float().reshape(6, 10)  # (out, in), no ties
    for group in ("per-row", "per-layer"):
        m = unstructured_mask(s, 0.5, group)
        assert int(m.sum()) == 30 and (group == "per-layer" or bool((m.sum(1) == 5).all()))
    row = unstructured_mask(s, 0.3, "per-row")
    assert torch.equal(unstructured_mask(s.t().contiguous(), 0.3, "per-row", dim=0), row.t())  # (in, out) layout


def test_option_types_generate_flags_that_parse_back():
    import argparse
    from typing import Literal

    from llmprune.options import add_option_flags, make_options, option_args, options_dict

    @dataclass(frozen=True)
    class Opts:
        steps: int = 3
        exact: bool = True
        order: Literal["rows", "columns"] = "rows"
        scale: float = 0.5

    p = argparse.ArgumentParser()
    add_option_flags(p, [("my-method", Opts)])
    assert p.parse_args([]).my_method_steps == 3
    a = p.parse_args(["--my-method-steps", "7", "--no-my-method-exact", "--my-method-order", "columns",
                      "--my-method-scale", "0.1"])
    got = make_options(Opts, {k: getattr(a, f"my_method_{k}") for k in ("steps", "exact", "order", "scale")},
                       "my-method")
    assert got == Opts(7, False, "columns", 0.1)
    back = p.parse_args(option_args("my-method", options_dict(got)))
    assert (back.my_method_steps, back.my_method_exact, back.my_method_order, back.my_method_scale) == (7, False,
                                                                                                        "columns", 0.1)
    with pytest.raises(SystemExit):
        p.parse_args(["--my-method-order", "diagonal"])
    with pytest.raises(LLMPruneError, match=r"unknown value of my_method_order 'diag'"):
        make_options(Opts, {"order": "diag"}, "my-method")
    with pytest.raises(LLMPruneError, match="my_method_steps must be an int, got 2.5"):
        make_options(Opts, {"steps": 2.5}, "my-method")
    with pytest.raises(LLMPruneError, match="my_method_exact must be a bool, got 1"):
        make_options(Opts, {"exact": 1}, "my-method")
