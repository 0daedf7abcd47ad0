"""Multi-turn text environments and their registry: ``make("grid", difficulty=2)``.

Built-in names: ``grid`` (a seeded key-and-door grid rendered as text, fast enough for a tiny model on
CPU) and ``textworld`` (generated TextWorld games; needs ``pip install 'onelayer[textworld]'``).
Other modules add theirs with ``register(name, factory)``.
"""

from __future__ import annotations

from onelayer.registry import Registry

from .base import Env, EnvError
from .grid import GridEnv
from .textworld_env import TextWorldEnv

__all__ = ["Env", "EnvError", "GridEnv", "TextWorldEnv", "make", "register", "registered"]

_ENVS = Registry("environment", "environments", EnvError)
register = _ENVS.register
registered = _ENVS.names
make = _ENVS.make  # make(name, **options) -> Env; errors name the valid environments and options
options = _ENVS.options  # options(name) -> the option names an environment accepts


register("grid", GridEnv)
register("textworld", TextWorldEnv)  # the module imports TextWorld only when an env is built
