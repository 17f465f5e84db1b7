"""Where the BOS token goes in calibration and perplexity windows: a policy, resolved once per (tokenizer, model).

The papers' protocol (SparseGPT, Wanda) tokenizes a text once and cuts it into windows, so at most the first window
starts with BOS (and only if the tokenizer adds one at the start of a text). Models trained to always see BOS first
(Gemma) score far worse on windows without it, and their calibration statistics would come from inputs they never
see in use. Policies (`--bos`):

- ``auto``: BOS on every window for models that need it (a model type containing "gemma": gemma, gemma2, gemma3,
  gemma3_text, ...), else the text as the tokenizer encodes it (the papers' single stream; e.g. Llama);
- ``always``: BOS on every window (an error when the tokenizer has no BOS token);
- ``never``: no BOS at all, not even at the start: the tokenizer's leading BOS is removed from each text.

Windows keep their length: BOS *replaces* the first token of each window ("replace-first"). The windows are cut
where they always were (same count, same seeded positions) and the tokens scored in a window (its 2nd to last) are
the same under ``auto`` and ``always``; only the first one's context becomes BOS. Token tensors a user gives are
used exactly as given ("as-given").
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .errors import LLMPruneError

log = logging.getLogger(__name__)

BOS_POLICIES = ("auto", "always", "never")
EVERY_WINDOW, TOKENIZER, NONE, AS_GIVEN = "every-window", "tokenizer", "none", "as-given"
_MODES = {EVERY_WINDOW: "replace-first", NONE: "strip-leading", TOKENIZER: "unchanged", AS_GIVEN: "unchanged"}


def check_bos_policy(policy: str) -> str:
    if policy not in BOS_POLICIES:
        raise LLMPruneError(f"unknown BOS policy {policy!r}; known: {', '.join(BOS_POLICIES)}")
    return policy


def model_needs_bos(model_config) -> bool:
    """Whether the model was trained to see BOS first in every sequence: Gemma-family model types (the top-level
    and the text config's), as lm-eval's sglang backend decides for "gemma" models."""
    if model_config is None:
        return False
    types = {getattr(model_config, "model_type", None)}
    if hasattr(model_config, "get_text_config"):
        types.add(getattr(model_config.get_text_config(), "model_type", None))
    return any(t and "gemma" in t for t in types)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding a text puts the tokenizer's BOS in front of it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass(frozen=True)
class BosPlan:
    """A resolved BOS policy: what was asked, what it means for this tokenizer and model, and why."""

    policy: str | None  # what was asked: auto | always | never (None: token ids given by the user)
    resolved: str  # every-window | tokenizer | none | as-given
    bos_token_id: int | None = None
    tokenizer_adds_bos: bool | None = None  # the tokenizer puts BOS at the start of each text it encodes
    reason: str = ""

    @property
    def mode(self) -> str:
        """How windows are made: replace-first (BOS replaces the first token), strip-leading (the text's leading BOS
        is removed), unchanged."""
        return _MODES[self.resolved]

    def text_ids(self, ids: list[int]) -> list[int]:
        """The token ids of one encoded text under this plan: without its leading BOS for `never`."""
        if self.resolved == NONE and ids and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            return ids[1:]
        return ids

    def windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(n, seqlen) windows under this plan: for every-window a copy with BOS in place of each first token."""
        if self.resolved != EVERY_WINDOW:
            return windows
        out = windows.clone()
        out[:, 0] = self.bos_token_id
        return out

    @property
    def lm_eval_add_bos_token(self) -> bool | None:
        """lm-eval HFLM's `add_bos_token` for the same policy: True (every request starts with BOS), False (none),
        None (the tokenizer's own rule)."""
        return {EVERY_WINDOW: True, NONE: False}.get(self.resolved)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "resolved": self.resolved, "mode": self.mode,
                "bos_token_id": self.bos_token_id, "tokenizer_adds_bos": self.tokenizer_adds_bos,
                "reason": self.reason}


AS_GIVEN_PLAN = BosPlan(None, AS_GIVEN, reason="token ids used exactly as given")


def resolve_bos(policy: str, tokenizer, model_config=None) -> BosPlan:
    """The BOS plan of `policy` for this tokenizer and model config (see the module docstring)."""
    check_bos_policy(policy)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    adds = tokenizer_adds_bos(tokenizer) if tokenizer is not None else None
    if policy == "never":
        return BosPlan(policy, NONE, bos, adds, "asked: no BOS, not even at the start of a text")
    if policy == "always":
        if bos is None:
            raise LLMPruneError("--bos always: the tokenizer has no BOS token; use --bos auto or never")
        return BosPlan(policy, EVERY_WINDOW, bos, adds, "asked: BOS on every window")
    if model_needs_bos(model_config):
        kind = getattr(model_config, "model_type", "?")
        if bos is None:
            log.warning("model type %s expects BOS first in every sequence, but the tokenizer has no BOS token: "
                        "windows are used as tokenized", kind)
            return BosPlan(policy, TOKENIZER, bos, adds, f"model type {kind} needs BOS, but the tokenizer has none")
        return BosPlan(policy, EVERY_WINDOW, bos, adds, f"model type {kind} expects BOS first in every sequence")
    return BosPlan(policy, TOKENIZER, bos, adds,
                   "the papers' single stream: BOS only where the tokenizer puts one, at the start of a text")


def tokenizer_for_plan(tokenizer, plan: BosPlan):
    """The tokenizer lm-eval should use under `plan`: for every-window, one that adds BOS at the start of each
    text (a copy with `add_bos_token=True` when the tokenizer does not already); otherwise `tokenizer` itself."""
    if plan.resolved != EVERY_WINDOW or plan.tokenizer_adds_bos:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    try:
        tok.add_bos_token = True
    except Exception:  # noqa: BLE001 - some tokenizers have no such switch; checked below
        pass
    if not tokenizer_adds_bos(tok):
        raise LLMPruneError("zero-shot with BOS on every request: this tokenizer cannot be made to add BOS "
                            "(add_bos_token); use --bos never or auto")
    return tok


__all__ = ["BOS_POLICIES", "BosPlan", "AS_GIVEN_PLAN", "resolve_bos", "model_needs_bos", "tokenizer_adds_bos",
           "tokenizer_for_plan", "check_bos_policy"]
