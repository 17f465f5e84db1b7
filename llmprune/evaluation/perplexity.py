"""Perplexity in the protocol of SparseGPT/Wanda: the test text tokenized once, cut into non-overlapping
windows of `seqlen` (tail dropped), ppl = exp(mean over windows of the mean next-token NLL).

WikiText-2: the raw test split joined with "\\n\\n". C4: the first 1100 validation documents joined with " ",
the first 256 windows (the reference's choice). The BOS policy (`llmprune.bos`) may put BOS in place of the first
token of every window (window length and scored tokens kept) or strip the text's leading BOS; the result records it.

The logits are never computed for a whole batch at once: the model runs up to its last block, then its own
tail (final norm, head, soft-capping) runs on chunks of tokens within a byte budget (`llmprune.logits`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..bos import AS_GIVEN_PLAN, BosPlan
from ..calibration.data import C4_EVAL_DOCS, named_source_text, resolve_data_dir
from ..errors import LLMPruneError
from ..logits import NotSplittable, logits_budget, split_model, window_nll
from ..models.arch import find_blocks
from ..progress import progress
from ..registry import unknown_name_message

log = logging.getLogger(__name__)

PPL_DATASETS = ("wikitext2", "c4")
C4_EVAL_WINDOWS = 256


def load_eval_tokens(name: str, tokenizer, data_dir: str | Path | None = None, seqlen: int | None = None,
                     bos: BosPlan | None = None):
    """The evaluation token stream (1-D int64) of a perplexity dataset, and where it came from.

    `bos`: the encoded text passes through `bos.text_ids` (for `never`, its leading BOS is removed)."""
    if name not in PPL_DATASETS:
        raise LLMPruneError(unknown_name_message("perplexity dataset", name, list(PPL_DATASETS)))
    ddir = resolve_data_dir(data_dir)
    if name == "wikitext2":
        rows, where = named_source_text("wikitext2", "test", ddir)
        text = "\n\n".join(rows)
    else:
        docs, where = named_source_text("c4", "validation", ddir)
        text = " ".join(docs[:C4_EVAL_DOCS])
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(bos.text_ids(ids) if bos is not None else ids, dtype=torch.int64)
    if name == "c4" and seqlen is not None:
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    return ids, where


def _splittable(model: nn.Module):
    """The model's blocks, or None for a model without a list of blocks (its full logits are then used)."""
    if not hasattr(model, "config"):
        return None
    try:
        return find_blocks(model)
    except LLMPruneError:
        return None


@contextlib.contextmanager
def compiled_blocks(model: nn.Module):
    """Within the context, each Transformer block runs through `torch.compile` (regional compilation: the
    blocks share their code, so one compilation serves all of them; RMSNorm, rotary and activations fuse).

    The model's top level stays eager on purpose: transformers then skips building the causal mask and SDPA
    runs its causal flash kernel, whereas under a whole-model compile transformers materializes the mask with
    torch < 2.14 (see `_ignore_causal_mask_sdpa`) and SDPA falls back to a masked kernel."""
    blocks = find_blocks(model).modules
    for block in blocks:
        block.compile(dynamic=False)
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # back to the eager forward


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1,
               device: str | torch.device | None = None, max_windows: int | None = None,
               compile: bool = False, desc: str = "perplexity", bos: BosPlan | None = None,
               logits_budget_mb: float | None = None) -> dict:
    """exp(mean token NLL) over the first `max_windows` non-overlapping windows of `seqlen` tokens of `ids`.

    `bos`: the windows pass through `bos.windows` (every-window: BOS replaces each window's first token, which is
    never scored); None uses them exactly as cut from `ids`. The plan is recorded under "bos".

    Logits are upcast to float32 for the loss, computed a chunk of tokens at a time so that at most about
    `logits_budget_mb` MiB of them are alive (default `llmprune.logits.logits_budget`); returns the protocol
    with the number. Batches are made equal in size (so a compiled forward sees one shape); `compile=True`
    compiles the Transformer blocks (`compiled_blocks`). A progress bar named `desc` counts the windows (off
    under ``TQDM_DISABLE``)."""
    if max_windows is not None and max_windows < 1:
        raise LLMPruneError(f"max_windows must be at least 1, got {max_windows} (None: all windows)")
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise LLMPruneError(f"the evaluation text ({ids.numel()} tokens) is shorter than one window of {seqlen}")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    bos = AS_GIVEN_PLAN if bos is None else bos
    windows = bos.windows(windows)
    batch_size = max(1, min(batch_size, nwin))
    batch_size = -(-nwin // -(-nwin // batch_size))  # as equal as possible: ceil(n / number of batches)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(model.parameters()).device
    if home != dev:
        model.to(dev)
    t0 = time.perf_counter()
    nll_sum = torch.zeros((), dtype=torch.float64, device=dev)
    bar = progress(total=nwin, desc=desc, unit="window", leave=False)
    blocks = _splittable(model)
    try:
        budget = logits_budget(dev, logits_budget_mb)
        with compiled_blocks(model) if compile else contextlib.nullcontext(), \
                split_model(model, blocks=blocks) if blocks is not None else contextlib.nullcontext() as split:
            for b0 in range(0, nwin, batch_size):
                x = windows[b0 : b0 + batch_size].to(dev, non_blocking=True)
                try:
                    nll = window_nll(model, x, budget, split)
                except NotSplittable as e:
                    log.warning("perplexity from the full logits of each batch: %s", e)
                    split = None
                    nll = window_nll(model, x, budget)
                nll_sum += nll.double().sum()
                bar.update(x.shape[0])
        nll_sum = nll_sum.cpu()
    finally:
        bar.close()
        if home != dev:
            model.to(home)
    seconds = time.perf_counter() - t0
    mean_nll = float(nll_sum) / nwin
    if not math.isfinite(mean_nll):
        log.warning("perplexity is not finite (NLL %s)", mean_nll)
    return {"ppl": math.exp(mean_nll) if mean_nll < 700 else float("inf"), "nll": mean_nll, "seqlen": seqlen,
            "windows": nwin, "tokens": nwin * seqlen, "seconds": seconds,
            "tokens_per_s": nwin * seqlen / seconds if seconds > 0 else None, "bos": bos.to_dict()}
