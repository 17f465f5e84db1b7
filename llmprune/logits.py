"""Next-token losses over a large vocabulary in bounded memory.

The logits of n tokens are n x vocab floats: 4 GiB in float32 for 4,096 tokens of a 262k vocabulary, before
the copies a loss makes. Here the model runs up to its last block only (`ModelSplit.hidden`), and the model's
own tail (final norm, OPT's project_out, the LM head, Gemma's logit soft-capping) is then applied to a chunk of
tokens at a time (`ModelSplit.logits`), the chunk sized so that its float32 logits and the loss's copies fit a
byte budget (`chunk_tokens`). Every step after the blocks is position-wise, so chunking changes nothing but the
order of the work: the per-token NLL is the same float32 value as from the full logits.

How the model is split is the model's own code, generically: for the body the block list is swapped for
wrappers that check the blocks run once each, in order, the last one raising after it ran (handing out its
output); for the tail it is swapped for pass-through modules, the first of which substitutes the given hidden
state for whatever the embeddings produced, and the model's ordinary forward runs on the chunk's token ids
(masks, positions and embedding scaling are computed as usual and then ignored). A model whose forward does
not fit that pattern raises NotSplittable (perplexity then falls back to the full logits).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LLMPruneError
from .models.arch import Blocks, find_blocks

log = logging.getLogger(__name__)

IGNORE = -100  # target of a position without a next token (F.cross_entropy's ignore_index)
DEFAULT_BUDGET_MB = 256  # CPU default; on a GPU a quarter of the free memory, between 256 MiB and 2 GiB
GPU_BUDGET_MAX_MB = 2048
NLL_COPIES = 3  # (tokens, vocab) float32 copies alive in a chunk's NLL: the logits, an upcast, the log-softmax


class NotSplittable(LLMPruneError):
    """The model's forward does not call its blocks once each, in order: it cannot be cut after the blocks."""


def vocab_size(model: nn.Module) -> int:
    """The width of the model's logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def logits_budget(device: torch.device | str, budget_mb: float | None = None) -> int:
    """Bytes of float32 logits (and their copies) one chunk may hold: `budget_mb` MiB if given, else
    DEFAULT_BUDGET_MB on the CPU and a quarter of the free memory on a GPU, clamped to [256 MiB, 2 GiB]."""
    if budget_mb is not None:
        if not budget_mb > 0:
            raise LLMPruneError(f"the logits budget must be > 0 MiB, got {budget_mb}")
        return max(1, int(budget_mb * 2**20))
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(GPU_BUDGET_MAX_MB * 2**20, max(DEFAULT_BUDGET_MB * 2**20, free // 4)))
    return DEFAULT_BUDGET_MB * 2**20


def chunk_tokens(vocab: int, budget: int, copies: int = NLL_COPIES) -> int:
    """Tokens per chunk: as many as `copies` float32 (tokens, vocab) tensors fitting in `budget` bytes, at least 1."""
    return max(1, budget // (vocab * 4 * copies))


def token_chunks(rows: int, cols: int, tokens: int) -> list[tuple[slice, slice]]:
    """Cover a (rows, cols) grid of positions with chunks of at most `tokens` positions: whole rows when a row
    fits, else pieces of one row."""
    if tokens >= cols:
        step = tokens // cols
        return [(slice(r, min(r + step, rows)), slice(0, cols)) for r in range(0, rows, step)]
    return [(slice(r, r + 1), slice(c, min(c + tokens, cols))) for r in range(rows) for c in range(0, cols, tokens)]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = ids[:, t + 1]; the last position, which has no next token, is IGNORE: (b, s) -> (b, s)."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    return targets


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position, in float32; 0 where the target is IGNORE: (..., vocab) x (...) -> (...)."""
    v = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), reduction="none", ignore_index=IGNORE)
    return nll.view(targets.shape)


class _Counted(nn.Module):
    """Wraps block `index`: records the call, runs the block; the last one then ends the model's forward,
    handing the block's output out."""

    def __init__(self, block: nn.Module, index: int, calls: list, last: bool):
        super().__init__()
        self.block, self.index, self.calls, self.last = block, index, calls, last

    def forward(self, *args, **kwargs):
        self.calls.append(self.index)
        out = self.block(*args, **kwargs)
        if self.last:
            raise _Stop(out)
        return out


class _Stop(Exception):
    def __init__(self, output):
        super().__init__()
        self.output = output


class _Substitute(nn.Module):
    """Stands in for block i: the first one replaces the hidden state by `slot["hidden"]`, all pass it on."""

    def __init__(self, slot: dict, first: bool, as_tuple: bool):
        super().__init__()
        self.slot, self.first, self.as_tuple = slot, first, as_tuple

    def forward(self, *args, **kwargs):
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            raise NotSplittable("a block was called without hidden states; this architecture is not supported")
        if self.first:
            hidden = self.slot["hidden"]
            self.slot["used"] += 1
        return (hidden,) if self.as_tuple else hidden


class ModelSplit:
    """`hidden(ids)`: the last block's output (b, s, hidden); `logits(hidden, ids)`: the model's own tail on it.
    Use inside `split_model`, which puts the blocks back."""

    def __init__(self, model: nn.Module, blocks: Blocks, device: torch.device, as_tuple: bool | None):
        self.model, self.blocks, self.device = model, blocks, device
        self.original = blocks.modules
        self.as_tuple = as_tuple  # whether the blocks return (hidden, ...); learned by `hidden` when None
        self._slot: dict = {"hidden": None, "used": 0}
        self._stand_ins: nn.ModuleList | None = None

    def _use(self, modules: nn.ModuleList) -> None:
        setattr(self.blocks.parent, self.blocks.attr, modules)

    def _forward(self, modules: nn.ModuleList, input_ids: torch.Tensor):
        self._use(modules)
        try:
            return self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except (AttributeError, TypeError, KeyError, IndexError) as e:  # the forward relies on its blocks' type
            raise NotSplittable(f"architecture {type(self.model).__name__} cannot be cut after its blocks: "
                                f"{type(e).__name__}: {e}") from e
        finally:
            self._use(self.original)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, calls = len(self.original), []
        body = nn.ModuleList(_Counted(block, i, calls, i == n - 1) for i, block in enumerate(self.original))
        try:
            self._forward(body, input_ids)
        except _Stop as stop:
            out = stop.output
        else:
            out = None
        if out is None or calls != list(range(n)):
            raise NotSplittable(f"architecture {type(self.model).__name__} is not supported here: its blocks are not "
                                "called once each in order")
        if self.as_tuple is None:
            self.as_tuple = isinstance(out, (tuple, list))
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self._stand_ins is None:
            n = len(self.original)
            self._stand_ins = nn.ModuleList(_Substitute(self._slot, i == 0, bool(self.as_tuple)) for i in range(n))
        slot = self._slot
        slot["hidden"], slot["used"] = hidden.to(self.device), 0
        try:
            out = self._forward(self._stand_ins, input_ids)
        finally:
            slot["hidden"] = None
        if slot["used"] != 1:
            raise NotSplittable(
                f"architecture {type(self.model).__name__} is not supported here: its blocks are not called once "
                "each in order"
            )
        return out.logits if hasattr(out, "logits") else out[0]


@contextlib.contextmanager
def split_model(model: nn.Module, device: torch.device | None = None, blocks: Blocks | None = None,
                as_tuple: bool | None = None) -> Iterator[ModelSplit]:
    """The model cut after its last block (`ModelSplit`). With `device`, the modules outside the blocks move
    there (and the model back home when the context exits); the blocks are always put back."""
    blocks = blocks if blocks is not None else find_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    split = ModelSplit(model, blocks, device, as_tuple)
    try:
        if home != device:
            split._use(nn.ModuleList())  # only the embeddings, the final norm and the head move
            model.to(device)
            split._use(split.original)
        yield split
    finally:
        split._use(split.original)
        if home != device:
            split._use(nn.ModuleList())
            model.to(home)
            split._use(split.original)


def chunked_window_nll(tail: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                       ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean next-token NLL of each window (b,), float32, the logits computed `tokens` positions at a time by
    `tail(hidden[rows, cols], ids[rows, cols])`: hidden (b, s, hidden), ids (b, s)."""
    b, s = ids.shape
    targets = ids[:, 1:]
    nll = torch.empty(b, s - 1, dtype=torch.float32, device=ids.device)  # per position, as from the full logits
    for rows, cols in token_chunks(b, s - 1, tokens):
        nll[rows, cols] = token_nll(tail(hidden[rows, cols], ids[rows, cols]), targets[rows, cols]).to(nll.device)
    return nll.mean(dim=1)


def window_nll(model: nn.Module, ids: torch.Tensor, budget: int, split: ModelSplit | None = None) -> torch.Tensor:
    """Mean next-token NLL of each window of `ids` (b, s) -> (b,), float32, holding at most about `budget` bytes
    of logits: through `split` when given, else from the model's full logits (a model that can't be split),
    the loss then taken in chunks of windows."""
    if split is not None:
        return chunked_window_nll(split.logits, split.hidden(ids), ids, chunk_tokens(vocab_size(model), budget))
    logits = model(input_ids=ids, use_cache=False).logits  # (b, s, vocab)
    per_row = max(1, chunk_tokens(logits.shape[-1], budget) // ids.shape[1])
    out = [token_nll(logits[r : r + per_row, :-1], ids[r : r + per_row, 1:]).mean(dim=1)
           for r in range(0, ids.shape[0], per_row)]
    return torch.cat(out)
