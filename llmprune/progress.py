"""Progress bars that honour ``TQDM_DISABLE`` when they are made, not when tqdm was imported.

tqdm reads its ``TQDM_*`` environment variables once, when the module is imported, and a bar made with an
explicit ``disable=False`` ignores them. The CLI's ``--quiet`` sets ``TQDM_DISABLE=1`` after tqdm is already
imported, so bars ask here instead."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bars_disabled() -> bool:
    """True when ``TQDM_DISABLE`` is set to a non-empty value (tqdm's own reading of it: any text disables)."""
    return bool(os.environ.get("TQDM_DISABLE"))


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar (counts, rate and ETA), off when :func:`bars_disabled` unless `disable` is given."""
    kwargs.setdefault("disable", bars_disabled())
    return tqdm(iterable, **kwargs)
