"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import re
import sys


class LLMPruneError(ValueError):
    """Bad input or an unsupported situation, with a message that says what to do."""


class OutOfMemory(LLMPruneError):
    """A step needed more memory than the machine has: names the step and the options that lower its memory."""

    def __init__(self, step: str, lower: str, detail: str = ""):
        self.step, self.lower, self.detail = step, lower, detail
        super().__init__(f"out of memory in {step}{f' ({detail})' if detail else ''}; to use less memory: {lower}")


_ALLOCATION_FAILED = ("can't allocate memory", "cannot allocate memory", "could not allocate", "out of memory",
                      "alloc_failed", "failed to allocate")


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (GPU, and the CPU allocator's), MemoryError, or a
    RuntimeError whose message says an allocation failed (CPU allocator, cuBLAS)."""
    if isinstance(e, LLMPruneError):
        return False
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _ALLOCATION_FAILED)


def allocation_detail(e: BaseException) -> str:
    """How much the failed allocation asked for, when the message says it ("tried to allocate 3.05 GiB")."""
    msg = str(e)
    m = re.search(r"tried to allocate (\d+) bytes", msg, re.IGNORECASE)
    if m:
        return f"tried to allocate {int(m.group(1)) / 2**30:.2f} GiB"
    m = re.search(r"tried to allocate ([\d.]+ ?[KMGT]i?B)", msg, re.IGNORECASE)
    if m:
        return f"tried to allocate {m.group(1)}"
    return ""


class memory_step:
    """`with memory_step("block scoring by block-ppl", "a smaller --batch-size"):` turns an allocation failure
    inside into an OutOfMemory error naming the step and what lowers its memory. An inner step's error passes
    through outer ones unchanged; the failed step's frames (and the tensors they hold) are released."""

    def __init__(self, step: str, lower: str):
        self.step, self.lower = step, lower

    def __enter__(self) -> "memory_step":
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or not is_out_of_memory(exc):
            return False
        detail = allocation_detail(exc)
        exc.__traceback__ = None  # the failed frames and their tensors go now, not when the new error does
        del exc, tb
        raise OutOfMemory(self.step, self.lower, detail) from None


# ---------------------------------------------------------------- naming the step an unexpected error came from

import contextvars as _contextvars  # noqa: E402

#: the steps open now, outermost first; each a [name, detail] list (`set_step`/`step_detail` change it in place)
_STEPS: _contextvars.ContextVar[tuple[list, ...]] = _contextvars.ContextVar("llmprune_steps", default=())
STEP_ATTR = "llmprune_step"  # set on an exception that left a `step`: the steps it passed, as one text


class step:
    """`with step("calibration"):` names the work inside it. An exception other than LLMPruneError that leaves
    it carries the open steps in `exc.llmprune_step` ("pruning, block 3/30"), which the CLI prints in its one
    line; nothing else changes (the exception propagates as it is). `step()` without a name opens a frame that
    `set_step` names as a job moves from one phase to the next, with no nesting (see `named_steps`)."""

    def __init__(self, name: str | None = None):
        self.frame = [name, None]

    def __enter__(self) -> "step":
        self._token = _STEPS.set(_STEPS.get() + (self.frame,))
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, LLMPruneError) and getattr(exc, STEP_ATTR, None) is None:
            try:
                setattr(exc, STEP_ATTR, current_step())
            except AttributeError:  # an exception type that takes no attributes
                pass
        _STEPS.reset(self._token)
        return False


def named_steps(fn):
    """Run `fn` inside an unnamed `step`, so that `set_step` calls in its body name its phases."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with step():
            return fn(*args, **kwargs)

    return wrapper


def set_step(name: str) -> None:
    """Name the innermost open step (and clear its detail): "loading the model", then "calibration", ... A no-op
    outside any step."""
    stack = _STEPS.get()
    if stack:
        stack[-1][:] = [name, None]


def step_detail(detail: str | None) -> None:
    """Say where inside the innermost step the work is ("block 3/30"); None clears it."""
    stack = _STEPS.get()
    if stack:
        stack[-1][1] = detail


def current_step() -> str | None:
    """The open steps, outermost first, with their details: "pruning, block 3/30"; None outside any."""
    parts = [p for name, detail in _STEPS.get() for p in (name, detail) if p]
    return ", ".join(parts) or None


def failed_step(exc: BaseException) -> str | None:
    """The steps an exception passed through on its way out (see `step`)."""
    return getattr(exc, STEP_ATTR, None)


def summary(exc: BaseException, limit: int = 300) -> str:
    """A one-line account of `exc` that does not stop mid-sentence: its message with the lines joined, cut at
    the last sentence end within `limit` characters; the type name when the message is empty."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    if len(text) > limit:
        cut = max(text.rfind(". ", 0, limit), text.rfind("; ", 0, limit))
        text = text[: cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."
    return text.rstrip(":")
