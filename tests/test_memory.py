"""Memory that does not grow with the vocabulary: logits in chunks within a byte budget (against the model's own
full logits on every family), out-of-memory errors as one line naming the step, and a run under a real
address-space limit on a tiny model with a 200k vocabulary."""

import json
import math
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmprune import logits as L
from llmprune.blocks import score_blocks
from llmprune.blocks.kl import token_kl
from llmprune.cli import main
from llmprune.errors import LLMPruneError, OutOfMemory, memory_step
from llmprune.evaluation.perplexity import perplexity

from conftest import FAMILIES, VOCAB, calib_tokens, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def budget_mb(tokens: int, copies: int = L.NLL_COPIES, vocab: int = VOCAB) -> float:
    """The budget that makes chunks of `tokens` positions."""
    return tokens * vocab * 4 * copies / 2**20


# ---------------------------------------------------------------- pure helpers

def test_chunk_arithmetic_and_cover():
    assert L.chunk_tokens(262_144, 256 * 2**20) == 85  # 256 MiB / (262k x 4 bytes x 3 copies)
    assert L.chunk_tokens(262_144, 1) == 1
    assert L.logits_budget("cpu") == 256 * 2**20 and L.logits_budget("cpu", 0.5) == 2**19
    with pytest.raises(LLMPruneError, match="must be > 0"):
        L.logits_budget("cpu", 0)
    for rows, cols, tokens in [(3, 16, 5), (3, 16, 16), (5, 16, 40), (1, 7, 100), (4, 1, 1)]:
        seen = torch.zeros(rows, cols, dtype=torch.int64)
        for r, c in L.token_chunks(rows, cols, tokens):
            assert seen[r, c].numel() <= tokens
            seen[r, c] += 1
        assert bool((seen == 1).all()), (rows, cols, tokens)
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert L.next_token_targets(ids).tolist() == [[6, 7, L.IGNORE], [2, 3, L.IGNORE]]


def test_token_nll_and_kl_equal_the_plain_formulas_exactly():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[:, -1] = L.IGNORE
    want = F.cross_entropy(a.reshape(-1, 11), targets.reshape(-1), reduction="none", ignore_index=-100).view(2, 5)
    assert torch.equal(L.token_nll(a, targets), want) and bool((want[:, -1] == 0).all())
    logp, logq = a.log_softmax(-1), b.log_softmax(-1)
    a0, b0 = a.clone(), b.clone()
    assert torch.equal(token_kl(a, b), (logp.exp() * (logp - logq)).sum(-1))
    assert torch.equal(a, a0) and torch.equal(b, b0)  # the in-place steps work on copies


# ---------------------------------------------------------------- the model cut after its blocks

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_is_the_models_own_forward_and_chunked_nll_equals_full(family):
    model, ids = tiny_model(family), calib_tokens(n=3, seqlen=16)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        want = F.cross_entropy(full[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        want = want.view(3, 15).mean(1)
        with L.split_model(model) as split:
            hidden = split.hidden(ids)
            assert torch.allclose(split.logits(hidden, ids), full, rtol=1e-6, atol=1e-6)
            got = L.window_nll(model, ids, L.logits_budget("cpu", budget_mb(5)), split)  # pieces of 5 positions
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert type(L.find_blocks(model).modules[0]).__name__.endswith(("Layer", "Block"))  # blocks put back


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "gpt2"])
def test_chunked_perplexity_equals_unchunked(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(3))
    plain = []
    with torch.no_grad():
        for i in range(4):
            x = ids[i * 16 : (i + 1) * 16].unsqueeze(0)
            lg = model(input_ids=x, use_cache=False).logits[0, :-1]
            plain.append(float(F.cross_entropy(lg, x[0, 1:])))
    want = math.exp(sum(plain) / 4)
    for mb in (budget_mb(3), budget_mb(20), None):  # pieces of a window, a window and a bit, all at once
        assert perplexity(model, ids, 16, batch_size=2, logits_budget_mb=mb)["ppl"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
@pytest.mark.parametrize("method", ["block-ppl", "block-kl"])
def test_chunked_block_scores_equal_unchunked(family, method):
    model, tokens = tiny_model(family, num_hidden_layers=3), calib_tokens(n=3, seqlen=16)
    whole = score_blocks(model, method, tokens, device="cpu", batch_size=2)
    chunked = score_blocks(model, method, tokens, device="cpu", batch_size=2, logits_budget_mb=budget_mb(4, 6))
    assert chunked == pytest.approx(whole, rel=1e-6)


class _OutOfOrder(torch.nn.Module):
    """Wraps a tiny Llama's decoder so that it runs its blocks in reverse order: not splittable."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kwargs):
        layers = self.inner.model.layers
        self.inner.model.layers = torch.nn.ModuleList(reversed(list(layers)))
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.inner.model.layers = layers


def test_a_model_that_cannot_be_split_falls_back_to_its_full_logits():
    inner = tiny_model("llama")
    with torch.no_grad():
        model = _OutOfOrder(inner).eval()
        model.config = inner.config
        ids = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(1))
        with L.split_model(model, blocks=L.find_blocks(inner)) as split, pytest.raises(L.NotSplittable):
            split.hidden(ids.view(2, 16))
        x = ids.view(2, 16)
        lg = model(input_ids=x).logits
        want = math.exp(float(F.cross_entropy(lg[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))))
    model.get_output_embeddings = inner.get_output_embeddings
    assert perplexity(model, ids, 16, batch_size=2)["ppl"] == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- out of memory: one line naming the step

def test_memory_step_names_the_step_and_what_lowers_it():
    with pytest.raises(OutOfMemory) as e:
        with memory_step("block scoring by block-ppl", "a smaller --logits-budget-mb"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of"
                                         " 79.1 GiB\nof which 1.2 GiB is free.")
    assert str(e.value) == ("out of memory in block scoring by block-ppl (tried to allocate 2.00 GiB); to use less "
                            "memory: a smaller --logits-budget-mb")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(OutOfMemory, match=r"in perplexity on c4 \(tried to allocate 3.05 GiB\)"):
        with memory_step("evaluation", "x"), memory_step("perplexity on c4", "y"):  # the inner step is named
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 3276800000 bytes. Error code 12 (Cannot allocate memory)")
    with pytest.raises(OutOfMemory, match="in loading"):
        with memory_step("loading", "x"):
            raise MemoryError()
    with pytest.raises(RuntimeError, match="shape mismatch"):  # anything else passes unchanged
        with memory_step("x", "y"):
            raise RuntimeError("shape mismatch")

    alive = []

    def step():
        held = torch.empty(1000)  # what a failed step holds is released with its frames
        alive.append(weakref.ref(held))
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(OutOfMemory) as held_error:
        with memory_step("x", "y"):
            step()
    assert held_error.value.step == "x" and alive[0]() is None  # while the error is still held


def _small_wikitext(d: Path) -> Path:
    (d / "wikitext2").mkdir(parents=True)
    rows = [{"text": " the quick brown fox jumps over the lazy dog . pruning large language models after training ."}] * 80
    (d / "wikitext2" / "wikitext-2-raw-v1.test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_cli_out_of_memory_in_a_step_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import llmprune.pipeline

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ...")

    monkeypatch.setattr(llmprune.pipeline, "perplexity", oom)
    out = tmp_path / "out"
    rc = main(["--model", str(tiny_model_dir), "--method", "magnitude", "--eval-seqlen", "16", "--output-dir", str(out),
               "--data-dir", str(_small_wikitext(tmp_path / "data")), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["llmprune: error: out of memory in perplexity on wikitext2 (tried to allocate 20.00 GiB); "
                               "to use less memory: a smaller --eval-batch-size or --logits-budget-mb, or --dtype "
                               "bfloat16"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_out_of_memory_outside_any_step_is_one_line(monkeypatch, capsys):
    import llmprune.pipeline

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")

    monkeypatch.setattr(llmprune.pipeline, "run_eval_job", oom)
    assert main(["eval", "--model", "whatever", "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "llmprune: error: out of memory (tried to allocate 1.00 GiB); to use less memory: a smaller --batch-size or "
        "--dtype bfloat16"]
    def bug(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(llmprune.pipeline, "run_eval_job", bug)
    assert main(["eval", "--model", "whatever", "-q"]) == 1  # other errors: the unexpected-error line (exit 1)
    assert capsys.readouterr().err.strip().splitlines() == [
        "llmprune: error: RuntimeError: bug (run with --debug for the traceback)"]
    assert main(["eval", "--model", "whatever", "-q", "--debug"]) == 1  # and their traceback under --debug
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_calibration_out_of_memory_names_the_block(monkeypatch):
    import llmprune.pruner
    from llmprune import PruneConfig, prune

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

    monkeypatch.setattr(llmprune.pruner, "observe", oom)
    with pytest.raises(OutOfMemory, match=r"^out of memory in calibration of block 0 .*--offload-activations cpu"):
        prune(tiny_model("llama"), PruneConfig(method="wanda", device="cpu"), calib_tokens())


def test_budget_option_is_validated():
    from llmprune.blocks import BlockPruneConfig
    from llmprune.config import EvalConfig

    for bad in (0, -1, float("nan")):
        with pytest.raises(LLMPruneError, match="logits_budget_mb"):
            EvalConfig(logits_budget_mb=bad)
        with pytest.raises(LLMPruneError, match="logits_budget_mb"):
            BlockPruneConfig("block-ppl", num_blocks=1, logits_budget_mb=bad)
    assert BlockPruneConfig.from_dict(BlockPruneConfig("block-kl", 1, logits_budget_mb=64).to_dict()).logits_budget_mb == 64


# ---------------------------------------------------------------- under a real address-space limit

# Runs in a child process: imports everything the runs need and loads the model once, measures the address
# space then (torch, pyarrow and the allocator map a lot before any tensor exists), sets RLIMIT_AS to that
# plus HEADROOM_MB, and runs the CLI once per argument list, each run's stderr followed by a separator line.
_CHILD = textwrap.dedent("""
    import gc, json, resource, sys
    import datasets, transformers  # noqa: F401  (their mappings belong to the baseline)
    from llmprune import blocks, cli, pipeline  # noqa: F401
    from llmprune.models import load_model

    headroom_mb, model_dir, runs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    load_model(model_dir); gc.collect()
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmPeak"))
    resource.setrlimit(resource.RLIMIT_AS, (peak + headroom_mb * 2**20, peak + headroom_mb * 2**20))
    for argv in runs:
        rc = cli.main(argv)
        gc.collect()
        print(f"{SEPARATOR} rc={rc}", file=sys.stderr, flush=True)
""")
SEPARATOR = "=== llmprune run ended"
BIG_VOCAB, SEQLEN, HEADROOM_MB = 200_000, 512, 512


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_block_scoring_and_perplexity_under_a_memory_limit(tmp_path):
    """The logits of 512 tokens over a 200k vocabulary are 0.4 GB in float32, and the loss doubles that: all at
    once (as before, and as a budget larger than the batch still does) they don't fit in 512 MiB above the
    baseline; in chunks of the default 256 MiB budget block scoring and perplexity do."""
    model = tiny_model("llama", vocab_size=BIG_VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1)  # 6.4M parameters, nearly all in the embeddings and the head
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, BIG_VOCAB, (1, SEQLEN), generator=torch.Generator().manual_seed(0)), tokens)
    common = ["--model", str(model_dir), "--method", "block-ppl", "--drop-blocks", "1", "--calib-data", str(tokens),
              "--device", "cpu", "-q"]
    runs = [common + ["--output-dir", str(tmp_path / "all-at-once"), "--logits-budget-mb", "4096", "--eval-ppl", "none"],
            common + ["--output-dir", str(tmp_path / "chunked"), "--eval-ppl", "wikitext2", "--eval-seqlen", str(SEQLEN),
                      "--eval-max-windows", "1", "--skip-dense-eval", "--data-dir", str(_small_wikitext(tmp_path / "d"))]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.run([sys.executable, "-c", _CHILD.replace("SEPARATOR", repr(SEPARATOR)), str(HEADROOM_MB),
                            str(model_dir), json.dumps(runs)], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr
    outputs = [part.strip().splitlines() for part in child.stderr.split(SEPARATOR)]

    failed = outputs[0]  # all logits at once: out of memory, one line, nothing written
    assert outputs[1][0] == "rc=2", child.stderr
    assert len(failed) == 1 and failed[0].startswith("llmprune: error: out of memory in block scoring by block-ppl"), failed
    assert "--logits-budget-mb" in failed[0] and "Traceback" not in child.stderr
    assert not (tmp_path / "all-at-once").exists() and not list(tmp_path.glob(".all-at-once*"))

    assert outputs[2] == ["rc=0"], child.stderr  # in chunks: it fits
    record = json.loads((tmp_path / "chunked" / "llmprune.json").read_text())
    assert len(record["blocks"]["removed"]) == 1 and math.isfinite(record["perplexity"]["pruned"]["wikitext2"]["ppl"])
