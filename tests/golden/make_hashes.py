"""Golden hashes of today's pruning results, for tests/test_golden.py.

For each case (a tiny seeded model of every family in tests/conftest.py `FAMILIES`, and the embedded default model
SmolLM2-135M) x method (magnitude, wanda, ria, sparsegpt) x pattern (unstructured at 50 %, 2:4, 4:8), the model is
pruned on the CPU and two sha256 are taken over every linear layer of every block, in block order and then in the
order `llmprune.models.linear_layers` gives, each layer's dotted name and (out, in) shape hashed before its data:

- `mask_sha256`: the prune mask, `weight == 0` (bool, one byte per weight) in (out, in) layout (`weight_oi`);
- `weight_sha256`: the float32 bytes of the weights after pruning (SparseGPT also updates the survivors; -0.0 and
  0.0 differ here).

A pattern that the model's widths do not allow is recorded as `{"refused": <the error line>}`. Each model's weights
before pruning (`dense_sha256`) and its calibration tokens (`calib_sha256`) are recorded too, so that a change of
the model (a new transformers initialises the tiny configs differently, GGUF dequantization changes) or of the
tokenization is told apart from a change of pruning.

Regenerate ONLY when a change of results is intended and explained (say why in the commit message):

    PYTHONPATH=. python tests/golden/make_hashes.py                    # all (~2 min; C4 from $LLMPRUNE_DATA_DIR)
    PYTHONPATH=. python tests/golden/make_hashes.py --only tiny        # tiny models only
    PYTHONPATH=. python tests/golden/make_hashes.py --out /tmp/h.json  # compare by hand

Each prune runs with one intra-op torch thread (`single_thread`): with two, SparseGPT's float32 weights differ in
their last bits, and so, through the calibration of the blocks after, can its masks (tests/test_golden.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:  # run as a script: conftest is importable like under pytest
    sys.path.insert(0, str(TESTS))

HASHES = HERE / "hashes.json"
METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
PATTERNS = {"unstructured": 0.5, "2:4": None, "4:8": None}  # pattern -> sparsity
TINY_CALIB = dict(n=8, seqlen=32, seed=1)  # conftest.calib_tokens(**TINY_CALIB): seeded ids, no tokenizer
# Every layer input of the 10 tiny families is 32, 64 or 128 wide, so each takes 2:4 and 4:8. One more tiny model
# has an MLP 60 wide (down_proj's input: divisible by 4, not by 8), so that the golden file also holds a refusal.
EXTRA_TINY = {"llama-ffn60": ("llama", {"intermediate_size": 60})}  # name -> (family, tiny_model overrides)
DEFAULT_CALIB = dict(source="c4", nsamples=4, seqlen=128, seed=0)  # CalibrationConfig(**DEFAULT_CALIB, data_dir=...)


@contextlib.contextmanager
def single_thread():
    """torch with one intra-op thread inside, the caller's count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def block_layers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(dotted name, weight (out, in)) of every linear layer of every block, in a fixed order."""
    from llmprune.models import find_blocks, linear_layers, weight_oi

    blocks = find_blocks(model)
    return [(f"{blocks.path}.{i}.{name}", weight_oi(layer))
            for i, block in enumerate(blocks.modules) for name, layer in linear_layers(block).items()]


def _header(name: str, w: torch.Tensor) -> bytes:
    return f"{name} {tuple(w.shape)}\n".encode()


def result_hashes(model: torch.nn.Module) -> dict:
    """mask_sha256 (bool `weight == 0`, (out, in)), weight_sha256 (float32 bytes, (out, in)) and the zero count over
    every block linear layer, each layer's name and shape hashed before its data; one pass over the weights."""
    hm, hw, zeros = hashlib.sha256(), hashlib.sha256(), 0
    for name, w in block_layers(model):
        assert w.dtype == torch.float32, f"{name}: float32 weights expected, got {w.dtype}"
        mask = (w == 0).contiguous()
        hm.update(_header(name, w))
        hm.update(mask.numpy().tobytes())
        hw.update(_header(name, w))
        hw.update(w.detach().contiguous().numpy().tobytes())
        zeros += int(mask.sum())
    return {"mask_sha256": hm.hexdigest(), "weight_sha256": hw.hexdigest(), "zeros": zeros}


def weight_hash(model: torch.nn.Module) -> str:
    return result_hashes(model)["weight_sha256"]


def prune_case(model: torch.nn.Module, method: str, pattern: str, tokens: torch.Tensor) -> dict:
    """Prune `model` in place on the CPU; its hashes, or `{"refused": message}` for a pattern it cannot take."""
    import llmprune
    from llmprune import LLMPruneError, PruneConfig

    config = PruneConfig(method=method, pattern=pattern, sparsity=PATTERNS[pattern], device="cpu")
    try:
        with single_thread():
            llmprune.prune(model, config, tokens)
    except LLMPruneError as e:
        return {"refused": str(e)}
    return result_hashes(model)


def tiny_tokens() -> torch.Tensor:
    from conftest import calib_tokens

    return calib_tokens(**TINY_CALIB)


def tiny_variants() -> dict[str, tuple[str, dict]]:
    """name -> (family, overrides of `tiny_model`): the 10 families of conftest as they are, then EXTRA_TINY."""
    from conftest import FAMILIES

    return {**{family: (family, {}) for family in FAMILIES}, **EXTRA_TINY}


def build_tiny(name: str) -> torch.nn.Module:
    from conftest import tiny_model

    family, overrides = tiny_variants()[name]
    return tiny_model(family, **overrides)


def tiny_results() -> dict:
    from llmprune.calibration.data import token_hash

    tokens = tiny_tokens()
    out = {}
    for name in tiny_variants():
        entry = {"dense_sha256": weight_hash(build_tiny(name)), "calib_sha256": token_hash(tokens), "cases": {}}
        for method in METHODS:
            for pattern in PATTERNS:
                entry["cases"][f"{method}/{pattern}"] = prune_case(build_tiny(name), method, pattern, tokens)
        out[name] = entry
    return out


def load_default():
    """The embedded default model in float32 and its calibration windows (4 x 128 tokens of the local C4)."""
    from conftest import data_dir

    from llmprune.calibration import load_calibration
    from llmprune.config import CalibrationConfig
    from llmprune.models import load_model

    loaded = load_model(None, torch.float32)
    model = loaded.model
    calib = load_calibration(CalibrationConfig(**DEFAULT_CALIB, data_dir=str(data_dir())),
                             loaded.tokenizer, vocab_size=model.get_input_embeddings().weight.shape[0],
                             model_config=model.config)
    return model, calib


def default_results() -> dict:
    model, calib = load_default()
    entry = {"model": "embedded default (SmolLM2-135M GGUF), float32", "calibration": DEFAULT_CALIB,
             "dense_sha256": weight_hash(model), "calib_sha256": calib.sha256, "cases": {}}
    for method in METHODS:
        for pattern in PATTERNS:
            t = time.perf_counter()
            entry["cases"][f"{method}/{pattern}"] = prune_case(copy.deepcopy(model), method, pattern, calib.tokens)
            print(f"default {method}/{pattern}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("tiny", "default", "all"), default="all")
    p.add_argument("--out", type=Path, default=HASHES, help=f"where to write (default {HASHES})")
    args = p.parse_args(argv)
    import transformers

    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data = {"about": "golden prune-mask and weight hashes of llmprune; made by tests/golden/make_hashes.py, checked "
                     "by tests/test_golden.py; regenerate only when a change of results is intended and explained",
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
            "methods": list(METHODS), "patterns": PATTERNS, "tiny_calibration": TINY_CALIB,
            "extra_tiny": EXTRA_TINY,
            "tiny": old.get("tiny"), "default": old.get("default")}
    t = time.perf_counter()
    if args.only in ("tiny", "all"):
        data["tiny"] = tiny_results()
        print(f"tiny families: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if args.only in ("default", "all"):
        t = time.perf_counter()
        data["default"] = default_results()
        print(f"default model: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
