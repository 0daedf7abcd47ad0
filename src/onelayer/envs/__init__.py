"""Multi-turn text environments and their registry: ``make("grid", difficulty=2)``.

Built-in names: ``grid`` (a seeded key-and-door grid rendered as text, fast enough for a tiny model on
CPU) and ``textworld`` (generated TextWorld games; needs ``pip install 'onelayer[textworld]'``).
Other modules add theirs with ``register(name, factory)``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from .base import Env, EnvError
from .grid import GridEnv
from .textworld_env import TextWorldEnv

__all__ = ["Env", "EnvError", "GridEnv", "TextWorldEnv", "make", "register", "registered"]

_REGISTRY: dict[str, Callable[..., Env]] = {}


def register(name: str, factory: Callable[..., Env], *, overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as ``make(name, **options)``."""
    if not callable(factory):
        raise TypeError(f"environment factory for {name!r} is not callable")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"environment {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    return sorted(_REGISTRY)


def option_names(name: str) -> list[str] | None:
    """Keyword options the factory of ``name`` accepts (None: it takes ``**kwargs``)."""
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make(name: str, **options) -> Env:
    """Build the environment registered as ``name``; errors name the valid choices."""
    if name not in _REGISTRY:
        raise EnvError(f"unknown environment {name!r}; registered environments: {', '.join(registered())}")
    valid = option_names(name)
    if valid is not None:
        for key in options:
            if key not in valid:
                raise EnvError(f"environment {name!r} has no option {key!r}; valid options: {', '.join(valid) or '(none)'}")
    return _REGISTRY[name](**options)


register("grid", GridEnv)
register("textworld", TextWorldEnv)  # the module imports TextWorld only when an env is built
