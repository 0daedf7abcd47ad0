"""``pyfunc``: write a one-line Python function from input/output examples (synthetic code task).

Small enough for the built-in character-level model, and scored like every code task: the program
runs in the sandbox against hidden tests. A prompt shows three examples ``input>output`` of a hidden
function ``f`` and ends in ``:``; the completion is the expression ``f`` returns, in ``x``::

    7>21 2>6 5>15:x*3

Here the prompt is ``"7>21 2>6 5>15:"`` and the expected completion ``x*3`` (prompts are terse because
every character is a token of the tiny model). The program run is ``def f(x):return <completion>``;
the test asserts the three shown examples and three hidden ones (``assert f(4) == 12`` …), so a
completion that hard-codes the examples does not pass.

Families (``k`` drawn from the range shown), by difficulty level:

====  =========================================================  ===========================
level functions                                                  inputs
====  =========================================================  ===========================
1     ``x+k`` (k 1..9), ``x*k`` (k 2..9)                          ints 0..9
2     level 1 and ``x-k`` (k 1..9), ``x%k`` and ``x//k`` (k 2..9)  ints 0..30
3     level 2 and string functions: ``x[::-1]``, ``x.upper()``,  ints 0..30; lowercase
      ``x*k`` (k 2..3), ``x[k:]`` / ``x[:k]`` (k 1..3),          words of 4-7 letters
      ``x+x[0]``
====  =========================================================  ===========================

Examples are chosen so that no other function of the level fits all three (the problem is
well-posed); a problem is the function plus its six inputs. Splits are disjoint by construction, as in
``arith``: a problem is an eval problem exactly when a SHA-256 hash of its canonical text is 0 mod 5.

Reward: ``reward="all"`` (default) gives 1.0 when all six asserts hold, so the eval score is the pass
rate; ``reward="fraction"`` gives the share that hold.
"""

from __future__ import annotations

import random
import string

from .base import TaskError, check_split, hash_split_is_eval
from .code import CodeTask

HEADER = "def f(x):return "
EVAL_MODULUS = 5

_INT_FUNCS = {
    "add": ("x+{k}", range(1, 10), lambda x, k: x + k),
    "mul": ("x*{k}", range(2, 10), lambda x, k: x * k),
    "sub": ("x-{k}", range(1, 10), lambda x, k: x - k),
    "mod": ("x%{k}", range(2, 10), lambda x, k: x % k),
    "div": ("x//{k}", range(2, 10), lambda x, k: x // k),
}
_STR_FUNCS = {
    "rev": ("x[::-1]", [0], lambda x, k: x[::-1]),
    "upper": ("x.upper()", [0], lambda x, k: x.upper()),
    "rep": ("x*{k}", range(2, 4), lambda x, k: x * k),
    "drop": ("x[{k}:]", range(1, 4), lambda x, k: x[k:]),
    "take": ("x[:{k}]", range(1, 4), lambda x, k: x[:k]),
    "first": ("x+x[0]", [0], lambda x, k: x + x[0]),
}
LEVELS = {
    1: (("add", "mul"), 9),
    2: (("add", "mul", "sub", "mod", "div"), 30),
    3: (("add", "mul", "sub", "mod", "div", "rev", "upper", "rep", "drop", "take", "first"), 30),
}
N_SHOWN, N_HIDDEN = 3, 3


def _spec(name):
    return _INT_FUNCS.get(name) or _STR_FUNCS[name]


def _functions(level: int) -> list[tuple[str, int]]:
    return [(name, k) for name in LEVELS[level][0] for k in _spec(name)[1]]


def _apply(name: str, k: int, x):
    return _spec(name)[2](x, k)


def _expr(name: str, k: int) -> str:
    return _spec(name)[0].format(k=k)


def is_eval_problem(canonical: str) -> bool:
    """Whether a canonical function (its expression) belongs to the eval split."""
    return hash_split_is_eval(canonical, EVAL_MODULUS)


class PyFuncTask(CodeTask):
    """Synthetic one-line functions from examples (see the module docstring)."""

    name = "pyfunc"
    max_completion_length = 12  # the longest answer, ``x.upper()``, is 9 characters, then EOS

    def __init__(self, difficulty: int = 1, n_train: int = 20000, n_eval: int = 500, seed: int = 0,
                 reward: str = "all", timeout_s: float = 2.0):
        if isinstance(difficulty, bool) or difficulty not in LEVELS:
            raise TaskError(f"pyfunc: difficulty={difficulty!r} is not a level; use one of "
                            f"{', '.join(map(str, LEVELS))} (see onelayer.tasks.pyfunc)")
        for key, n in (("n_train", n_train), ("n_eval", n_eval)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TaskError(f"pyfunc: {key}={n!r} must be a non-negative integer")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TaskError(f"pyfunc: seed={seed!r} must be an integer")
        super().__init__(reward=reward, timeout_s=timeout_s)
        self.difficulty, self.n_train, self.n_eval, self.seed = difficulty, n_train, n_eval, seed
        self.options = {"difficulty": difficulty, "n_train": n_train, "n_eval": n_eval, "seed": seed,
                        "reward": reward, "timeout_s": self.timeout_s}
        self._cache: dict[str, list[dict]] = {}

    def _input(self, rng: random.Random, name: str):
        if name in _STR_FUNCS:
            return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7)))
        return rng.randint(0, LEVELS[self.difficulty][1])

    def _problem(self, rng: random.Random) -> dict | None:
        funcs = _functions(self.difficulty)
        name, k = rng.choice(funcs)
        inputs: list = []
        while len(inputs) < N_SHOWN + N_HIDDEN:
            x = self._input(rng, name)
            if x not in inputs:
                inputs.append(x)
        shown = inputs[:N_SHOWN]
        outputs = [_apply(name, k, x) for x in inputs]
        same_kind = [(n, kk) for n, kk in funcs if (n in _STR_FUNCS) == (name in _STR_FUNCS) and (n, kk) != (name, k)]
        for other in same_kind:  # well-posed: the shown examples single out this function
            if all(_apply(*other, x) == y for x, y in zip(shown, outputs)):
                return None
        canonical = f"{_expr(name, k)}|{inputs!r}"
        prompt = " ".join(f"{x!r}>{y!r}" for x, y in zip(shown, outputs)) + ":"
        test = "\n".join(f"assert f({x!r}) == {y!r}" for x, y in zip(inputs, outputs)) + "\n"
        return {"id": canonical, "prompt": prompt, "test": test, "entry_point": "f", "format": "pyfunc",
                "solution": _expr(name, k), "function": name}

    def items(self, split: str) -> list[dict]:
        check_split(split)
        if split not in self._cache:
            want_eval = split == "eval"
            n = self.n_eval if want_eval else self.n_train
            rng = random.Random(f"pyfunc:{self.difficulty}:{self.seed}:{split}")
            chosen: dict[str, dict] = {}
            attempts = 0
            while len(chosen) < n and attempts < 50 * n + 1000:
                attempts += 1
                item = self._problem(rng)
                if item is not None and item["id"] not in chosen and is_eval_problem(item["id"]) == want_eval:
                    chosen[item["id"]] = item
            self._cache[split] = list(chosen.values())
        return [dict(it) for it in self._cache[split]]

    def program(self, item: dict, completion: str) -> str:
        return HEADER + completion
