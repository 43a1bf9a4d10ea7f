"""Named registries behind the extension points (cost metrics, export formats, bitwidth estimators): one name rule,
one "already registered" rule and one "must be one of" error for all of them (docs/extending.md).

A leaf module (no project imports), so every package can build its registry without import cycles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "RegistryNames"]

T = TypeVar("T")
IDENTIFIER = (re.compile(r"^[A-Za-z][A-Za-z0-9_]*$"), "a letter followed by letters, digits or '_'")


class Registry(Mapping[str, T], Generic[T]):
    """``name -> item`` in registration order, read-only as a mapping; :meth:`add`, :meth:`remove` and :meth:`lookup`
    raise one-line ``ValueError`` s that name the ``kind`` of item, the rule and the registered names.

    Args:
        kind: what an item is, for the messages ("metric", "export format", ...).
        name_rule: ``(compiled pattern, description)`` a name must match (default: an identifier).
        hint: appended to the unknown-name error (e.g. how to register one).
    """

    def __init__(self, kind: str, name_rule: tuple[re.Pattern, str] = IDENTIFIER, hint: str = "") -> None:
        self.kind, self.hint = kind, hint
        self._pattern, self._rule = name_rule
        self._items: dict[str, T] = {}

    def check(self, name: object, replace: bool = False) -> None:
        """Raise unless ``name`` is a valid name that is free (or ``replace``)."""
        if not isinstance(name, str) or not self._pattern.match(name):
            raise ValueError(f"{self.kind} name must be {self._rule}, got {name!r}")
        if name in self._items and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")

    def add(self, name: str, item: T, replace: bool = False) -> T:
        self.check(name, replace)
        self._items[name] = item
        return item

    def lookup(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise ValueError(f"{self.kind} must be one of {tuple(self._items)}, got {name!r}{self.hint}")
        return self._items[name]

    def remove(self, name: str) -> None:
        """Remove ``name`` (``ValueError`` for an unknown one)."""
        self.lookup(name)
        del self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class RegistryNames(Sequence[str]):
    """A live, read-only view of a registry's names (compares equal to the tuple of names); ``keep(value)`` selects
    the entries shown."""

    def __init__(self, registry: Mapping[str, Any], keep: Callable[[Any], bool] | None = None) -> None:
        self._registry, self._keep = registry, keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, v in self._registry.items() if self._keep is None or self._keep(v))

    def __getitem__(self, index):  # noqa: ANN001 - int or slice, as tuple's
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return self._names() == (tuple(other) if isinstance(other, (tuple, list, RegistryNames)) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())
