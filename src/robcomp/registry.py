"""One small generic registry: components are registered under explicit string names."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message says what is available."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps explicit names to components (classes or factory functions).

    Example:
        >>> ATTACKS: Registry[type] = Registry("attack")
        >>> @ATTACKS.register("pgd")
        ... class PGD: ...
        >>> ATTACKS.get("pgd") is PGD
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name``; duplicates are an error."""

        def decorator(item: T) -> T:
            self.add(name, item)
            return item

        return decorator

    def add(self, name: str, item: T) -> None:
        if not name or name != name.strip():
            raise RegistryError(f"invalid {self.kind} name {name!r}")
        if name in self._items:
            raise RegistryError(
                f"{self.kind} {name!r} is already registered (by {self._items[name]!r}); "
                "pick another name"
            )
        self._items[name] = item

    @contextmanager
    def temporarily(self, name: str, item: T) -> Iterator[T]:
        """Register ``item`` as ``name`` for the ``with`` block only (tests, notebooks).

        A component registered for one test must not leak into the next: code that
        enumerates a registry (validation coverage, ``robcomp list``) would see it.
        """
        self.add(name, item)
        try:
            yield item
        finally:
            del self._items[name]

    def get(self, name: str) -> T:
        """Return the component registered as ``name``; an unknown name suggests the closest."""
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}"

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


# Folders ``module:callable`` models are imported from (robcomp.models), besides sys.path: the
# experiment file's folder, the CLI's working directory, the folder a checkpoint's code came from.
# Here, not in robcomp.models, so that the CLI can enter it before anything loads torch.
_CODE_PATHS: ContextVar[tuple[str, ...]] = ContextVar("robcomp_code_paths", default=())


@contextmanager
def code_paths(*folders: str | Path | None) -> Iterator[None]:
    """Within the block, ``module:callable`` models are also imported from ``folders`` (None
    entries are skipped), as pytest puts its rootdir on the import path. A folder is put on
    ``sys.path`` when a model is first imported from it, and stays there, since the imported
    code may import its neighbours later."""
    extra = tuple(str(Path(f).expanduser().resolve()) for f in folders if f is not None)
    token = _CODE_PATHS.set(_CODE_PATHS.get() + extra)
    try:
        yield
    finally:
        _CODE_PATHS.reset(token)


def code_folders() -> tuple[str, ...]:
    """The folders the enclosing :func:`code_paths` blocks added, outermost first."""
    return _CODE_PATHS.get()
