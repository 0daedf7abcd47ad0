"""Synthetic arithmetic: the default task, short enough for the built-in character-level model.

A prompt is a problem followed by ``=`` (``"23+58="``); the expected completion is the answer digits
(``"81"``), after which the model should stop (the trainer appends EOS to demonstrations).

Difficulty levels (operands are drawn uniformly from the ranges shown):

====  =====================  ============================  ==================
level problem                operands                      distinct problems
====  =====================  ============================  ==================
1     ``a+b``                a, b in 0..9                  100
2     ``a+b``                a, b in 10..99                8,100
3     ``a+b`` or ``a-b``     a, b in 10..99 (answer may    16,200
                             be negative, e.g. ``-35``)
4     ``a+b``                a, b in 100..999              810,000
5     ``a+b+c``              a, b, c in 10..99             729,000
6     ``a*b``                a in 10..99, b in 2..9        720
7     ``a+b``, ``a-b``,      a, b in 0..9                  300
      ``a*b``
8     level 7, and ``a+b``   level 7; or a in 10..99 and   1,200
      with a two-digit a     b in 0..9
====  =====================  ============================  ==================

Levels 7 and 8 are sized for a small pretrained model (SmolLM2-135M-Instruct with few-shot prompts
starts inside the 15-60 % band on them; README), where levels 2-6 start near 0 %.

Splits are disjoint by construction: a problem belongs to ``eval`` exactly when a SHA-256 hash of its
canonical text (``"23+58"``) is 0 mod 5, independently of ``seed`` and ``difficulty``, so no eval
problem can ever appear in train. ``seed`` only chooses which problems of each split are drawn and in
what order. Items within a split are distinct; when a level has fewer problems than requested
(level 1 has about 20 eval problems) the split holds all of them.
"""

from __future__ import annotations

import random
import re

from .base import Task, TaskError, check_split, hash_split_is_eval

# level -> its problem forms, each (operators, operand ranges); the first range is for a, then b (then c).
# A level with several forms holds the union of their problems.
Form = tuple[tuple[str, ...], tuple[tuple[int, int], ...]]
_ONE_DIGIT_MIX: Form = (("+", "-", "*"), ((0, 9), (0, 9)))
LEVELS: dict[int, tuple[Form, ...]] = {
    1: ((("+",), ((0, 9), (0, 9))),),
    2: ((("+",), ((10, 99), (10, 99))),),
    3: ((("+", "-"), ((10, 99), (10, 99))),),
    4: ((("+",), ((100, 999), (100, 999))),),
    5: ((("+",), ((10, 99), (10, 99), (10, 99))),),
    6: ((("*",), ((10, 99), (2, 9))),),
    7: (_ONE_DIGIT_MIX,),
    8: (_ONE_DIGIT_MIX, (("+",), ((10, 99), (0, 9)))),
}

EVAL_MODULUS = 5  # 1 in 5 problems is reserved for eval
_ENUMERATE_MAX = 100_000  # pools up to this size are enumerated; bigger ones are sampled
_INT = re.compile(r"-?\d+")


def is_eval_problem(problem: str) -> bool:
    """Whether a canonical problem (``"23+58"``) belongs to the eval split."""
    return hash_split_is_eval(problem, EVAL_MODULUS)


def _answer(problem: str) -> str:
    # Problems only contain non-negative integers, + - * ; evaluate left to right with * first.
    total, sign, term = 0, 1, None
    for tok in re.findall(r"\d+|[+\-*]", problem):
        if tok == "+" or tok == "-":
            total += sign * term
            sign, term = (1 if tok == "+" else -1), None
        elif tok == "*":
            continue
        else:
            term = int(tok) if term is None else term * int(tok)
    return str(total + sign * term)


class ArithTask(Task):
    """Synthetic arithmetic (see the module docstring for the difficulty levels)."""

    name = "arith"
    max_completion_length = 8  # answers are at most 6 characters, then EOS
    answer_type = "number"  # prompt formats extract a number before scoring (onelayer.tasks.prompts)

    def __init__(self, difficulty: int = 2, n_train: int = 20000, n_eval: int = 500, seed: int = 0):
        if isinstance(difficulty, bool) or difficulty not in LEVELS:
            raise TaskError(
                f"arith: difficulty={difficulty!r} is not a level; use one of "
                f"{', '.join(map(str, LEVELS))} (see onelayer.tasks.arith for what each level means)"
            )
        for key, n in (("n_train", n_train), ("n_eval", n_eval)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TaskError(f"arith: {key}={n!r} must be a non-negative integer")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TaskError(f"arith: seed={seed!r} must be an integer")
        self.difficulty, self.n_train, self.n_eval, self.seed = difficulty, n_train, n_eval, seed
        self.options = {"difficulty": difficulty, "n_train": n_train, "n_eval": n_eval, "seed": seed}
        self._cache: dict[str, list[dict]] = {}

    # -- problem generation -------------------------------------------------------------------
    def _form_sizes(self) -> list[int]:
        sizes = []
        for ops, ranges in LEVELS[self.difficulty]:
            size = len(ops) ** (len(ranges) - 1)
            for lo, hi in ranges:
                size *= hi - lo + 1
            sizes.append(size)
        return sizes

    def _pool_size(self) -> int:
        return sum(self._form_sizes())

    def _all_problems(self) -> list[str]:
        out: list[str] = []
        for ops, ranges in LEVELS[self.difficulty]:
            problems = [str(v) for v in range(ranges[0][0], ranges[0][1] + 1)]
            for lo, hi in ranges[1:]:
                problems = [f"{p}{op}{v}" for p in problems for op in ops for v in range(lo, hi + 1)]
            out.extend(problems)
        return list(dict.fromkeys(out))  # forms may overlap (7+5 is in two); each problem once

    def _random_problem(self, rng: random.Random) -> str:
        forms = LEVELS[self.difficulty]
        # one form: no draw for it, so single-form levels give the same problems as before forms existed
        ops, ranges = forms[0] if len(forms) == 1 else rng.choices(forms, weights=self._form_sizes())[0]
        text = str(rng.randint(*ranges[0]))
        for lo, hi in ranges[1:]:
            text += rng.choice(ops) + str(rng.randint(lo, hi))
        return text

    def _problems(self, split: str, n: int) -> list[str]:
        want_eval = split == "eval"
        # str seeds are hashed with SHA-512 by random.seed, so this is stable across processes
        rng = random.Random(f"arith:{self.difficulty}:{self.seed}:{split}")
        if self._pool_size() <= _ENUMERATE_MAX:
            pool = [p for p in self._all_problems() if is_eval_problem(p) == want_eval]
            rng.shuffle(pool)
            return pool[:n]
        chosen: dict[str, None] = {}  # insertion-ordered set
        attempts = 0
        while len(chosen) < n and attempts < 50 * n + 1000:
            attempts += 1
            p = self._random_problem(rng)
            if p not in chosen and is_eval_problem(p) == want_eval:
                chosen[p] = None
        return list(chosen)

    # -- Task API -----------------------------------------------------------------------------
    def items(self, split: str) -> list[dict]:
        check_split(split)
        if split not in self._cache:
            n = self.n_train if split == "train" else self.n_eval
            self._cache[split] = [
                {"id": p, "prompt": p + "=", "answer": _answer(p)} for p in self._problems(split, n)
            ]
        return [dict(it) for it in self._cache[split]]

    def answer(self, item: dict, completion: str) -> str:
        """The first word when it is an integer (what ``score`` compares), else ""."""
        words = completion.split(maxsplit=1)
        return words[0] if words and _INT.fullmatch(words[0]) else ""

    def score(self, item: dict, completion: str) -> float:
        answer = self.answer(item, completion)
        return 1.0 if answer and answer == str(item["answer"]) else 0.0

    def demonstration(self, item: dict) -> str:
        return str(item["answer"])

    def chat_prompt(self, item: dict) -> str:
        """The problem as a question, for chat-formatted prompts."""
        return f"What is {item['id']}? Answer with the number only."
