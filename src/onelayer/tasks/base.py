"""The single-turn task interface: items for a split, a scorer, and demonstrations for warm start.

A task yields items (plain dicts with a stable ``id``, the ``prompt`` and its answer fields) for the
``train`` and ``eval`` splits, scores a completion against an item with a float in [0, 1], and can
supply a correct completion (a *demonstration*) for the supervised warm start of tiny models. Its
``answer`` is what a majority vote over several models' (or samples') completions compares.
"""

from __future__ import annotations

import hashlib

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


# -- options shared by the file-backed tasks (gsm8k, math, code_jsonl, humaneval) --------------------


def check_sources(name: str, path, train_path, eval_path, formats: str = "") -> None:
    """Exactly one of: `path` (split by eval_fraction), or both `train_path` and `eval_path`."""
    if path is not None and (train_path is not None or eval_path is not None):
        raise TaskError(f"{name}: pass either path (split by eval_fraction) or train_path/eval_path, not both")
    if path is None and (train_path is None or eval_path is None):
        given = "train_path" if train_path is not None else "eval_path" if eval_path is not None else None
        hint = f" ({given} alone is not enough)" if given else ""
        raise TaskError(f"{name}: no data{hint}; pass path=FILE (split into train/eval by eval_fraction) "
                        f"or both train_path=FILE and eval_path=FILE{formats}")


def source_options(path, train_path, eval_path) -> dict:
    return {"path": None if path is None else str(path), "train_path": None if train_path is None else str(train_path),
            "eval_path": None if eval_path is None else str(eval_path)}


def check_fraction(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        hint = " or null (no holdout)" if allow_none else ""
        raise TaskError(f"{name}: eval_fraction={value!r} must be a number between 0 and 1 (exclusive){hint}")
    return float(value)


def check_count(name: str, key: str, n) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise TaskError(f"{name}: {key}={n!r} must be a non-negative integer or null (all items)")
    return n


def check_seed(name: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskError(f"{name}: seed={seed!r} must be an integer")
    return seed


def in_eval(seed: int, key: str, eval_fraction: float) -> bool:
    """Whether the item with ``key`` goes to eval under the deterministic SHA-256 holdout."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    return u < eval_fraction


def holdout(items: list[dict], seed: int, eval_fraction: float, key) -> dict[str, list[dict]]:
    """Train / eval splits of ``items`` by the SHA-256 holdout of ``key(item)`` (``in_eval``), order kept."""
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for it in items:
        splits["eval" if in_eval(seed, key(it), eval_fraction) else "train"].append(it)
    return splits


def first_n(splits: dict[str, list | None], n_train: int | None, n_eval: int | None) -> dict[str, list | None]:
    """The train / eval splits cut to their first n_train / n_eval items (n None: all; a None split stays None)."""
    cut = lambda items, n: items if n is None or items is None else items[:n]  # noqa: E731
    return {"train": cut(splits["train"], n_train), "eval": cut(splits["eval"], n_eval)}


def hash_split_is_eval(key: str, modulus: int = 5) -> bool:
    """The synthetic tasks' and environments' split: an item is held out for eval when the SHA-256 of its
    ``key`` (the problem text, or the environment's layout) is 0 mod ``modulus``, so the same problem or
    room never lands in both splits, whatever seed generated it."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % modulus == 0


class Task:
    """Base class of single-turn tasks.

    Subclasses set ``name`` and ``options`` (the resolved options, JSON-serialisable: they are
    recorded in run configs so a run can be rebuilt with ``tasks.make(name, **options)``) and
    implement ``items`` and ``score``.

    What the trainer reads, each with its default here (override as class attributes):
    ``max_completion_length`` (the completion budget when the config sets none), ``train_defaults``
    (settings the task suggests when the config leaves them unset: ``prompts_per_step``, ``max_steps``,
    ``learning_rate``, ``warmup_steps``, ``check_every``), ``warm_start`` (fields of
    ``onelayer.train.warmstart.WarmStartSettings`` for built-in models), ``stop_strings`` (a completion
    ends at the first; raw prompts have none), ``answer_type`` ("number": the few-shot and chat formats
    extract the number first) and ``chat_prompt`` (the question as a chat message).
    """

    name: str = "task"
    options: dict = {}
    max_completion_length: int = 64
    train_defaults: dict = {}
    warm_start: dict = {}
    stop_strings: tuple[str, ...] = ()
    answer_type: str = "text"

    def chat_prompt(self, item: dict) -> str:
        """The item's question as a chat message (prompt format chat); by default its prompt."""
        return item["prompt"]

    def items(self, split: str) -> list[dict]:
        """The items of ``split`` ("train" or "eval"); deterministic for the same options.

        Each item has ``id`` (str, stable), ``prompt`` (str) and the task's answer fields.
        Unknown split → ValueError.
        """
        raise NotImplementedError

    def score(self, item: dict, completion: str) -> float:
        """Reward of ``completion`` (the generated text after the prompt) for ``item``, in [0, 1]."""
        raise NotImplementedError

    def answer(self, item: dict, completion: str) -> str:
        """The answer ``completion`` gives for ``item``, as a majority vote compares answers: two completions
        with the same answer get the same score. "" means no answer (a vote skips it). By default the
        completion stripped; a task whose score reads less of the completion (a number, a parse, a
        program) returns just that."""
        return completion.strip()

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
