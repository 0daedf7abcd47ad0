"""The single-turn task interface: items for a split, a scorer, and demonstrations for warm start.

A task yields items (plain dicts with a stable ``id``, the ``prompt`` and its answer fields) for the
``train`` and ``eval`` splits, scores a completion against an item with a float in [0, 1], and can
supply a correct completion (a *demonstration*) for the supervised warm start of tiny models.
"""

from __future__ import annotations

SPLITS = ("train", "eval")


class TaskError(ValueError):
    """A user-facing task error (bad option, unreadable file, malformed row).

    Messages name the problem and how to fix it.
    """


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split name, else raise ValueError naming the valid ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


class Task:
    """Base class of single-turn tasks.

    Subclasses set ``name`` and ``options`` (the resolved options, JSON-serialisable: they are
    recorded in run configs so a run can be rebuilt with ``tasks.make(name, **options)``) and
    implement ``items`` and ``score``.
    """

    name: str = "task"
    options: dict = {}

    def items(self, split: str) -> list[dict]:
        """The items of ``split`` ("train" or "eval"); deterministic for the same options.

        Each item has ``id`` (str, stable), ``prompt`` (str) and the task's answer fields.
        Unknown split → ValueError.
        """
        raise NotImplementedError

    def score(self, item: dict, completion: str) -> float:
        """Reward of ``completion`` (the generated text after the prompt) for ``item``, in [0, 1]."""
        raise NotImplementedError

    def score_batch(self, items: list[dict], completions: list[str]) -> list[float]:
        """Scores of aligned ``items`` and ``completions``; by default calls ``score`` on each pair."""
        if len(items) != len(completions):
            raise ValueError(f"score_batch got {len(items)} items but {len(completions)} completions")
        return [float(self.score(it, c)) for it, c in zip(items, completions)]

    def demonstration(self, item: dict) -> str | None:
        """A correct completion of ``item`` for the supervised warm start, or None if unavailable."""
        return None

    def sft_pairs(self, items: list[dict]) -> list[tuple[str, str]]:
        """(prompt, completion) pairs for the supervised warm start: the items' demonstrations."""
        return [(it["prompt"], d) for it in items if (d := self.demonstration(it)) is not None]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"
