"""An ordered table of named entries: the built-in ones, plus ones added at run time (tests, experiments).

Holds the torch-free task catalog (rock_dist.tasks.catalog) and the registry of task objects
(rock_dist.tasks.registry), so that both look up, add and remove entries the same way.
"""

from __future__ import annotations

from typing import Generic, Iterable, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Listing(Generic[T]):
    """Entries by `name`, in order: the `builtin` ones first; `what` names an entry in error messages."""

    def __init__(self, what: str, builtin: Iterable[T]) -> None:
        self.what = what
        self.builtin: tuple[T, ...] = tuple(builtin)
        self._entries: dict[str, T] = {entry.name: entry for entry in self.builtin}

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[T, ...]:
        return tuple(self._entries.values())

    def get(self, name: str) -> T:
        """The entry called `name` (KeyError naming the registered ones when there is none)."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; registered: {' '.join(self._entries)}") from None

    def register(self, entry: T) -> T:
        """Add `entry` after the others (ValueError if its name is taken); returns it."""
        if entry.name in self._entries:
            raise ValueError(f"an {self.what} called {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry added with `register` (ValueError for a built-in one)."""
        if any(entry.name == name for entry in self.builtin):
            raise ValueError(f"{name!r} is a built-in task")
        self._entries.pop(name, None)


__all__ = ["Listing", "Named"]
