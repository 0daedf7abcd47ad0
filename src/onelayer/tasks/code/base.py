"""``CodeTask``, the base of every code task: completion → program → sandbox verdict → reward.

Scoring. ``score_batch`` runs the whole batch in ONE ``sandbox.check_programs`` call (never one
sandbox per item): ``reward="all"`` gives 1.0 when every test assertion ran and held (status
``passed``), else 0.0; ``reward="fraction"`` gives the share of assertion sites that held
(``ExecResult.fraction``). ``timeout_s`` (default 5) is the wall-clock limit per program. Both are
options of every code task.
"""

from __future__ import annotations

from onelayer import sandbox

from ..base import Task, TaskError
from .extract import build_program

REWARDS = ("all", "fraction")


class CodeTask(Task):
    """Base class of code tasks; items carry ``prompt``, ``test``, ``entry_point`` (may be None),
    ``format`` ("humaneval": the completion continues the prompt; "mbpp": it is the whole program)
    and optionally ``solution`` (a correct completion, the demonstration).
    """

    name = "code"
    max_completion_length = 384

    def __init__(self, reward: str = "all", timeout_s: float = 5.0):
        if reward not in REWARDS:
            raise TaskError(f"{self.name}: reward={reward!r} is not one of {', '.join(REWARDS)} "
                            f"(all: 1 when every test passes; fraction: share of assertions that pass)")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise TaskError(f"{self.name}: timeout_s={timeout_s!r} must be a positive number of seconds")
        self.reward = reward
        self.timeout_s = float(timeout_s)

    def program(self, item: dict, completion: str) -> str:
        """The program run against ``item``'s test for ``completion``."""
        continuation = item.get("format", "humaneval") == "humaneval"
        return build_program(item["prompt"], completion, item.get("entry_point"), continuation)

    def answer(self, item: dict, completion: str) -> str:
        """The program run against the tests (what the score depends on)."""
        return self.program(item, completion)

    def execute(self, items: list[dict], completions: list[str]) -> list[sandbox.ExecResult]:
        """Sandbox verdicts of aligned items and completions, from one ``check_programs`` call."""
        if len(items) != len(completions):
            raise ValueError(f"got {len(items)} items but {len(completions)} completions")
        if not items:
            return []
        jobs = [(self.program(it, c), it["test"], it.get("entry_point")) for it, c in zip(items, completions)]
        return sandbox.check_programs(jobs, timeout_s=self.timeout_s)

    def reward_of(self, result: sandbox.ExecResult) -> float:
        return result.fraction if self.reward == "fraction" else (1.0 if result.ok else 0.0)

    def score_batch(self, items: list[dict], completions: list[str]) -> list[float]:
        return [self.reward_of(r) for r in self.execute(items, completions)]

    def score(self, item: dict, completion: str) -> float:
        return self.score_batch([item], [completion])[0]

    def demonstration(self, item: dict) -> str | None:
        return item.get("solution")
