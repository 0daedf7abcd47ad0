"""Name → factory registries (tasks, environments): registration, option checking, errors naming choices."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def option_names(factory: Callable) -> list[str] | None:
    """Keyword options ``factory`` accepts, or None when it takes ``**kwargs`` (anything goes)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class Registry:
    """Factories by name; ``make`` checks option names against the factory's signature.

    ``kind`` words the messages ("task" → "unknown task 'x'; registered tasks: …"); user errors are
    raised as ``error`` (a ValueError subclass the CLI reports in one line).
    """

    def __init__(self, kind: str, plural: str, error: type[Exception]):
        self.kind, self.plural, self.error = kind, plural, error
        self._factories: dict[str, Callable] = {}

    def register(self, name: str, factory: Callable, *, overwrite: bool = False) -> None:
        """Make ``factory(**options)`` available as ``make(name, **options)``."""
        if not callable(factory):
            raise TypeError(f"{self.kind} factory for {name!r} is not callable")
        if name in self._factories and not overwrite and self._factories[name] is not factory:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
        self._factories[name] = factory

    def factories(self) -> dict[str, Callable]:
        """Every name and its factory (a subclass may add names registered elsewhere)."""
        return self._factories

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.factories())

    def options(self, name: str) -> list[str] | None:
        """The option names ``name``'s factory accepts (None: any, or ``name`` is not registered)."""
        factories = self.factories()
        return option_names(factories[name]) if name in factories else None

    def make(self, name: str, **options):
        """Build ``name`` with ``options``; unknown names and options raise ``error`` naming the valid ones."""
        factories = self.factories()
        if name not in factories:
            raise self.error(f"unknown {self.kind} {name!r}; registered {self.plural}: {', '.join(self.names())}")
        factory = factories[name]
        valid = option_names(factory)
        if valid is not None:
            for key in options:
                if key not in valid:
                    raise self.error(f"{self.kind} {name!r} has no option {key!r}; "
                                     f"valid options: {', '.join(valid) or '(none)'}")
        return factory(**options)
