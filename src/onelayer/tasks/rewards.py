"""User reward functions with TRL's signature, and loading them from a "module:attr" string.

A reward function is called as ``f(prompts=[...], completions=[...], **columns) -> list[float | None]``
where ``columns`` are the item fields other than ``prompt`` (``answer``, ``id``, …), each a list
aligned with ``prompts`` — the same call TRL's ``GRPOTrainer`` makes, so reward functions written for
TRL work unchanged. ``None`` (or NaN) means "not applicable to this sample".
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .base import Task, TaskError

RewardFunc = Callable[..., list]


def _func_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


class RewardFuncTask(Task):
    """``task``'s items and demonstrations, scored by ``funcs`` instead of ``task.score``.

    The score of a sample is ``Σ_i w_i · f_i(sample)`` over the functions that returned a value for
    it (None/NaN are skipped, like TRL's nansum); a sample for which every function returned None
    scores 0.0. Scores are whatever the functions return, not clipped to [0, 1].
    """

    def __init__(self, task: Task, funcs: RewardFunc | Sequence[RewardFunc], weights: Sequence[float] | None = None):
        funcs = [funcs] if callable(funcs) else list(funcs)
        if not funcs:
            raise TaskError("RewardFuncTask needs at least one reward function")
        for f in funcs:
            if not callable(f):
                raise TaskError(f"reward function {f!r} is not callable; pass functions f(prompts, completions, **columns)")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise TaskError(f"got {len(weights)} reward weights for {len(funcs)} reward functions; give one weight per function")
        self.task, self.funcs, self.weights = task, funcs, weights
        self.name = task.name
        self.options = {
            **task.options,
            "reward_funcs": [_func_name(f) for f in funcs],
            "reward_weights": weights,
        }

    def items(self, split: str) -> list[dict]:
        return self.task.items(split)

    def demonstration(self, item: dict) -> str | None:
        return self.task.demonstration(item)

    def answer(self, item: dict, completion: str) -> str:
        """The completion itself: reward functions may read all of it (whitespace too)."""
        return completion

    def score(self, item: dict, completion: str) -> float:
        return self.score_batch([item], [completion])[0]

    def score_batch(self, items: list[dict], completions: list[str]) -> list[float]:
        if len(items) != len(completions):
            raise ValueError(f"score_batch got {len(items)} items but {len(completions)} completions")
        if not items:
            return []
        prompts = [it["prompt"] for it in items]
        keys = dict.fromkeys(k for it in items for k in it if k != "prompt")
        columns = {k: [it.get(k) for it in items] for k in keys}
        totals = [0.0] * len(items)
        for f, w in zip(self.funcs, self.weights):
            out = f(prompts=prompts, completions=list(completions), **columns)
            if out is None or len(out) != len(items):
                got = "None" if out is None else f"{len(out)} values"
                raise TaskError(f"reward function {_func_name(f)} returned {got} for {len(items)} completions; "
                                f"return one float (or None) per completion")
            for i, v in enumerate(out):
                if v is None:
                    continue
                v = float(v)
                if not math.isnan(v):
                    totals[i] += w * v
        return totals


def load_callable(spec: str) -> Callable:
    """Load ``"package.module:attr"`` or ``"path/to/file.py:attr"`` (attr may be dotted)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise TaskError(f"cannot load {spec!r}: write 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise TaskError(f"cannot load {spec!r}: file {target!r} not found")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        mod_name = f"_onelayer_user_{path.stem}_{digest}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # so dataclasses/pickle inside the file can find it
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise TaskError(f"cannot load {spec!r}: running {target} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise TaskError(f"cannot load {spec!r}: no importable module {target!r} ({e}); "
                            f"check the name or use 'path/to/file.py:{attr}'") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"cannot load {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"cannot load {spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    return obj
