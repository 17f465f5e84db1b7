"""Named registries with did-you-mean suggestions (one method = one file + one registration line)."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import LLMPruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table whose lookup failure lists the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def register_class(self, name: str) -> Callable[[T], T]:
        """Class decorator that also sets `cls.name = name` (one registration line beside each method)."""

        def deco(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.register(name)(cls)

        return deco

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise LLMPruneError(unknown_name_message(self.kind, name, self.names())) from None


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}"
