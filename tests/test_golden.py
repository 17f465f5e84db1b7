"""Golden results: pruning on the CPU gives bit-identical masks and weights to those stored in tests/golden/hashes.json.

The hashes were made by tests/golden/make_hashes.py from the code as it was before the engine refactor (issue 12);
the module's docstring says what is hashed. Regenerate them only when a change of results is intended and explained.

Each case runs with one intra-op torch thread (`single_thread`, the caller's count restored after): with two
threads SparseGPT's updated weights differ in their last bits (torch.cholesky_inverse and some of its matrix
products round differently with 2 threads here; the Cholesky factor itself and the forward passes did not), and
because block i+1 is calibrated on the outputs of the pruned block i, so can a later block's SparseGPT mask.
Magnitude, Wanda and RIA gave identical masks and weights with 1 and 2 threads; with the count pinned, every hash
was identical across separate processes and whatever OMP_NUM_THREADS said (measured on an AMD EPYC with AVX-512,
torch 2.13 CPU; a CPU whose kernels round differently may need the hashes made there). Both hashes are compared
exactly. The default model's cases (slow) take about 2 minutes on 2 cores, its conversion from GGUF included.
"""

from __future__ import annotations

import copy
import json

import pytest

from golden import make_hashes as golden  # tests/golden/make_hashes.py (tests/ is on sys.path, like conftest)
from llmprune.calibration.data import token_hash

STORED = json.loads(golden.HASHES.read_text())
CASES = [(m, p) for m in golden.METHODS for p in golden.PATTERNS]
REGENERATE = ("if this change of results is intended, explain it and regenerate: "
              "python tests/golden/make_hashes.py (see its docstring)")


def _check_case(model, method: str, pattern: str, tokens, expected: dict, dense_sha256: str, what: str) -> None:
    got = golden.prune_case(model, method, pattern, tokens)
    if "refused" in expected:
        assert "refused" in got, f"{what}: refused before ({expected['refused']!r}), now pruned; {REGENERATE}"
        assert golden.weight_hash(model) == dense_sha256, f"{what}: refused but left the model changed"
        return
    assert "refused" not in got, f"{what}: pruned before, now refused: {got['refused']}"
    assert got["mask_sha256"] == expected["mask_sha256"], (
        f"{what}: the prune mask changed ({got['zeros']} zeros, {expected['zeros']} before); {REGENERATE}")
    assert got["weight_sha256"] == expected["weight_sha256"], (
        f"{what}: same mask, but the weights after pruning changed; {REGENERATE}")
    assert got["zeros"] == expected["zeros"]


def test_golden_file_covers_the_whole_matrix():
    assert STORED["methods"] == list(golden.METHODS) and STORED["patterns"] == golden.PATTERNS
    assert list(STORED["tiny"]) == list(golden.tiny_variants())  # the 10 conftest families (+ EXTRA_TINY)
    for name, entry in [*STORED["tiny"].items(), ("default", STORED["default"])]:
        assert list(entry["cases"]) == [f"{m}/{p}" for m, p in CASES], name
    refused = {(name, case) for name, e in STORED["tiny"].items() for case, r in e["cases"].items() if "refused" in r}
    assert refused == {("llama-ffn60", f"{m}/4:8") for m in golden.METHODS}  # the only width not divisible by M


@pytest.mark.parametrize("name", list(golden.tiny_variants()))
def test_tiny_model_and_calibration_unchanged(name):
    """What goes in is what went in when the hashes were made (else the hashes cannot be compared)."""
    entry = STORED["tiny"][name]
    assert token_hash(golden.tiny_tokens()) == entry["calib_sha256"], "conftest.calib_tokens changed"
    assert golden.weight_hash(golden.build_tiny(name)) == entry["dense_sha256"], (
        f"the tiny {name} model itself changed (transformers {STORED['made_with']['transformers']} made it); "
        "that is not a change of pruning")


@pytest.mark.parametrize("method, pattern", CASES)
@pytest.mark.parametrize("name", list(golden.tiny_variants()))
def test_tiny_golden(name, method, pattern):
    entry = STORED["tiny"][name]
    _check_case(golden.build_tiny(name), method, pattern, golden.tiny_tokens(), entry["cases"][f"{method}/{pattern}"],
                entry["dense_sha256"], f"tiny {name} {method} {pattern}")


# ---------------------------------------------------------------- the embedded default model (SmolLM2-135M)

@pytest.fixture(scope="module")
def default_model():
    return golden.load_default()  # (model float32, calibration: 4 windows x 128 tokens of the local C4)


@pytest.mark.slow
def test_default_model_and_calibration_unchanged(default_model):
    model, calib = default_model
    assert calib.sha256 == STORED["default"]["calib_sha256"], "the calibration tokens changed (tokenizer, C4 sampling)"
    assert golden.weight_hash(model) == STORED["default"]["dense_sha256"], "the loaded default model changed"


@pytest.mark.slow
@pytest.mark.parametrize("method, pattern", CASES)
def test_default_golden(default_model, method, pattern):
    model, calib = default_model
    entry = STORED["default"]
    _check_case(copy.deepcopy(model), method, pattern, calib.tokens, entry["cases"][f"{method}/{pattern}"],
                entry["dense_sha256"], f"default model {method} {pattern}")

