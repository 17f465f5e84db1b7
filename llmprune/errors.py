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
