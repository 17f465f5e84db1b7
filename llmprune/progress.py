"""Progress bars that honour ``TQDM_DISABLE`` when they are made, not when tqdm was imported, and that stay
readable in a log file.

tqdm reads its ``TQDM_*`` environment variables once, when the module is imported, and a bar made with an
explicit ``disable=False`` ignores them. The CLI's ``--quiet`` sets ``TQDM_DISABLE=1`` after tqdm is already
imported, so bars ask here instead.

Where a bar goes, decided when it is made (``LLMPRUNE_PROGRESS``):

* stderr is a terminal (or ``LLMPRUNE_PROGRESS=1``): a live tqdm bar, redrawn in place with carriage returns;
* stderr is redirected to a file or a pipe (``LLMPRUNE_PROGRESS`` unset): a *log bar*, a plain line with the
  bar's state (count, rate, ETA) at most every :data:`LOG_INTERVAL` seconds and one last line when it ends,
  only for loops that take that long: no carriage returns, no cursor moves, nothing for short loops;
* ``LLMPRUNE_PROGRESS=0`` or ``TQDM_DISABLE`` set (``--quiet``): no bar.

Bars and log lines share stderr through :func:`logging_redirect_tqdm` (the CLI wraps each command in it), so a
log line is printed above a live bar instead of being glued to it."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from types import ModuleType

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm as _tqdm_logging_redirect

ENV = "LLMPRUNE_PROGRESS"
#: Seconds between two lines of a log bar (stderr not a terminal).
LOG_INTERVAL = 30.0


def bars_disabled() -> bool:
    """True when ``TQDM_DISABLE`` is set to a non-empty value (tqdm's own reading of it: any text disables) or
    ``LLMPRUNE_PROGRESS`` is 0/off/false/no."""
    if os.environ.get("TQDM_DISABLE"):
        return True
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


def _forced() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def live_bars(file=None) -> bool:
    """True when bars are drawn live on `file` (default stderr): not disabled, and `file` is a terminal or
    ``LLMPRUNE_PROGRESS=1``. Other libraries' bars (lm-eval's) are shown only then."""
    return not bars_disabled() and (_forced() or _isatty(sys.stderr if file is None else file))


class LogBar(tqdm):
    """A tqdm bar for a log file: its state as a plain line (no carriage return, no cursor move) at most every
    `interval` seconds and only when its count moved, never its empty start or the clearing and redrawing
    around other output, and one final line when it closes after having printed before. Counting, rates and
    formatting are tqdm's."""

    def __init__(self, *args, interval: float | None = None, **kwargs):
        self._interval = interval = LOG_INTERVAL if interval is None else interval
        self._last_line = time.monotonic()
        self._printed_n = None  # the count of the last line printed (None: none yet)
        kwargs.setdefault("mininterval", interval)
        super().__init__(*args, **kwargs)

    def _line(self) -> None:
        self.fp.write(self.__str__().rstrip() + "\n")
        self.fp.flush()
        self._printed_n = self.n
        self._last_line = time.monotonic()

    def display(self, msg=None, pos=None):  # noqa: ARG002 - tqdm's signature
        due = time.monotonic() >= self._last_line + 0.9 * self._interval  # tqdm's clock ticks nearly with ours
        if msg is None and self.n and self.n != self._printed_n and due:
            self._line()
        return False  # nothing drawn that close() would have to clear

    def clear(self, nolock=False):  # noqa: ARG002 - nothing on screen to clear
        pass

    def moveto(self, n):  # noqa: ARG002 - lines never move the cursor
        pass

    def close(self):
        if not self.disable and self._printed_n is not None and self.n != self._printed_n:
            self._line()  # how the loop ended
        self.leave = False
        super().close()


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar (counts, rate and ETA): live on a terminal, a :class:`LogBar` on a redirected stderr (its
    `interval`, default LOG_INTERVAL, may be given), off when :func:`bars_disabled` (unless `disable` is given)."""
    kwargs.setdefault("disable", bars_disabled())
    if kwargs["disable"] or live_bars(kwargs.get("file")):
        kwargs.pop("interval", None)  # a LogBar's
        return tqdm(iterable, **kwargs)
    return LogBar(iterable, **kwargs)


def logging_redirect_tqdm():
    """Route the root logger's console handlers through ``tqdm.write`` while the context is open, so that log
    lines print above live bars (tqdm's own :func:`tqdm.contrib.logging.logging_redirect_tqdm`)."""
    return _tqdm_logging_redirect(tqdm_class=tqdm)


@contextlib.contextmanager
def routed_bars(*modules: ModuleType) -> Iterator[None]:
    """While open, the bars that `modules` make with their module-level ``tqdm`` (e.g. transformers' GGUF
    de-quantization bar) are made by :func:`progress`: hidden by ``--quiet``, plain lines in a log. Modules
    without a ``tqdm`` global are left alone; each one's own is put back on exit."""
    saved = [(m, m.tqdm) for m in modules if callable(getattr(m, "tqdm", None))]
    for m, _ in saved:
        m.tqdm = progress
    try:
        yield
    finally:
        for m, own in saved:
            m.tqdm = own
