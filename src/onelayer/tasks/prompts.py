"""Prompt formats for pretrained and instruct models, and the answer extraction each one needs.

A task's items carry a terse ``prompt`` (``"23+58="``) that suits the character-level built-ins. A
pretrained model needs more context. ``formatted(task, tok, fmt)`` wraps a task so that its items'
prompts are rendered in one of three formats, and its scorer first extracts the answer the way that
format needs:

- ``raw``: the task's own prompt; the completion is scored as it is.
- ``fewshot``: ``shots`` solved *train* items (``prompt`` + demonstration, one per line) before the
  problem, drawn once with a fixed seed, never from the eval split and never the item itself. The
  sampler stops at the end of the line (stop string ``"\\n"``); a numeric answer is the first number.
- ``chat``: the tokenizer's own chat template around the task's ``chat_prompt(item)`` (a question in
  words, where the task defines one), with an optional system message. A numeric answer is taken
  with math-verify, then the last ``\\boxed{}``, then the last number.

Agent tasks keep their turn prompts; with ``chat`` each turn is wrapped in the chat template.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .agent import is_agent
from .base import TaskError

PROMPT_FORMATS = ("raw", "fewshot", "chat")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class PromptFormat:
    kind: str = "raw"  # raw, fewshot or chat
    shots: int = 4  # fewshot: solved examples before the problem
    system: str | None = None  # chat: a system message (None: the template's own default, if any)
    seed: int = 0  # fewshot: which train items become the examples

    def __post_init__(self):
        if self.kind not in PROMPT_FORMATS:
            raise TaskError(f"unknown prompt_format {self.kind!r}; use one of {', '.join(PROMPT_FORMATS)}")
        if self.shots < 1:
            raise TaskError(f"fewshot_k={self.shots}: a few-shot prompt needs at least one example")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("\n",) if self.kind == "fewshot" else ()


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    return m.group(0) if m else None


def chat_number(text: str) -> str | None:
    """The numeric answer of a chat reply: math-verify's parse, else the last \\boxed{}, else the last number."""
    try:
        from math_verify import parse

        parsed = parse(text)
        if len(parsed) > 1 and _NUMBER.fullmatch(str(parsed[1]).strip()):
            return str(parsed[1]).strip()
    except Exception:  # noqa: BLE001 - math-verify may time out or fail on odd text; fall back
        pass
    boxed = _BOXED.findall(text)
    if boxed and (n := first_number(boxed[-1])):
        return n
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to (not including) the first of the stop strings."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class FormattedTask:
    """A task whose prompts are rendered in a `PromptFormat` and whose scorer extracts answers first.

    Everything else (name, options, splits, demonstrations, agent attributes) is the wrapped task's.
    """

    def __init__(self, task, tok, fmt: PromptFormat):
        self.task, self.tok, self.fmt = task, tok, fmt
        self.stop_strings = fmt.stop_strings
        if fmt.kind == "chat" and not getattr(tok, "chat_template", None):
            raise TaskError("prompt_format chat needs a tokenizer with a chat template; this model has none "
                            "(use prompt_format fewshot or raw)")
        self._shots: list[tuple[str, str, str]] = []
        if fmt.kind == "fewshot" and not is_agent(task):
            pool = [(it["id"], it["prompt"], d) for it in task.items("train")
                    if (d := task.demonstration(it)) is not None and "\n" not in d]
            if len(pool) <= fmt.shots:
                raise TaskError(f"prompt_format fewshot needs more than {fmt.shots} train items with one-line "
                                f"demonstrations; {task.name} has {len(pool)}")
            self._shots = random.Random(f"fewshot:{fmt.seed}").sample(pool, fmt.shots + 1)

    def __getattr__(self, name):
        return getattr(self.task, name)

    @property
    def max_completion_length(self) -> int:
        """The task's budget; a chat reply gets more room (instruct models restate the question first)."""
        base = self.task.max_completion_length
        return base + 24 if self.fmt.kind == "chat" else base

    def __repr__(self) -> str:
        return f"{self.task!r} [{self.fmt.kind}]"

    # -- prompts ----------------------------------------------------------------------------
    def _chat(self, content: str) -> str:
        messages = ([{"role": "system", "content": self.fmt.system}] if self.fmt.system else []) + [
            {"role": "user", "content": content}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, item: dict) -> str:
        if self.fmt.kind == "fewshot":
            shots = [s for s in self._shots if s[0] != item["id"]][: self.fmt.shots]
            return "".join(f"{p}{d}\n" for _, p, d in shots) + item["prompt"]
        if self.fmt.kind == "chat":
            return self._chat(self.task.chat_prompt(item))
        return item["prompt"]

    def items(self, split: str) -> list[dict]:
        items = self.task.items(split)
        if is_agent(self.task) or self.fmt.kind == "raw":
            return items
        return [{**it, "raw_prompt": it["prompt"], "prompt": self.render(it)} for it in items]

    def prompt(self, *args, **kwargs) -> str:
        """Agent tasks: one turn's prompt, in the chat template when the format is chat."""
        text = self.task.prompt(*args, **kwargs)
        return self._chat(text) if self.fmt.kind == "chat" else text

    # -- scoring ----------------------------------------------------------------------------
    def extract(self, completion: str) -> str:
        """What the wrapped task scores: the completion cut at the stop string, and for numeric answers
        the number this format puts it in."""
        text = cut_at_stop(completion, self.stop_strings)
        if self.task.answer_type != "number" or self.fmt.kind == "raw":
            return text
        n = first_number(text) if self.fmt.kind == "fewshot" else chat_number(text)
        return "" if n is None else n

    def answer(self, item: dict, completion: str) -> str:
        """The wrapped task's answer of what it scores (`Task.answer`)."""
        return self.task.answer(item, self.extract(completion))

    def score(self, item: dict, completion: str) -> float:
        return self.task.score(item, self.extract(completion))

    def score_batch(self, items: list[dict], completions: list[str]) -> list[float]:
        return self.task.score_batch(items, [self.extract(c) for c in completions])


TRAINED_FORMAT_FILE = "onelayer_prompt.json"  # written beside a trained model: the format it was trained with
CHAR_VOCAB_MAX = 1000  # a vocabulary this small is character-level (the built-ins and models trained from them)


def default_format(model_name: str, tok, task) -> str:
    """The prompt format a model gets when none is asked for.

    A model trained by onelayer keeps the format it was trained with (``onelayer_prompt.json`` in its
    directory). Character-level models (the built-ins) get raw. A built-in real model gets the format
    measured best on it (README). Any other model gets its chat template when it has one (chat was best
    on most arith levels for the built-in real model), else few-shot prompts (base models); agent tasks
    use raw turn prompts on a model without a chat template.
    """
    import json
    from pathlib import Path

    from onelayer.models.real import REAL_MODELS

    saved = Path(str(model_name)).expanduser() / TRAINED_FORMAT_FILE
    if saved.is_file():
        return json.loads(saved.read_text())["prompt_format"]
    if len(tok) <= CHAR_VOCAB_MAX:
        return "raw"
    if model_name in REAL_MODELS and not is_agent(task):
        return REAL_MODELS[model_name].prompt_format
    if getattr(tok, "chat_template", None):
        return "chat"
    return "raw" if is_agent(task) else "fewshot"


def formatted(task, tok, fmt: PromptFormat):
    """``task`` in format ``fmt`` (the task itself for raw single-turn prompts)."""
    if fmt.kind == "raw":
        return task
    return FormattedTask(task, tok, fmt)
