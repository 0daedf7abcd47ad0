"""What one benchmark run is: its settings (`BenchSpec`, per model), the prompts both tools get and the reward.

Per-model settings live in `MODEL_SETTINGS` (the rest are `BenchSpec`'s defaults): the tiny models get 16
prompts x G=4 completions of at most 24 new tokens on their terse arith prompts, the real one 8 prompts x
G=8 of at most 8 new tokens on few-shot arith prompts (level 8, sized for small pretrained models). Both
tools draw their prompts from the same train split, rendered by the benchmark's task (onelayer then
trains with `prompt_format raw`, so neither stops at a newline or cuts the completion). The reward (share
of digits in the completion) is the same function in both, so advantages are not all zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from onelayer.config import BenchConfig

DEFAULT_MODELS = tuple(BenchConfig().models)  # `onelayer bench --models`' default
LAYER_SETS = ("all", "middle:1")


class BenchError(RuntimeError):
    """The benchmark cannot run (e.g. TRL missing); the message says how to fix it."""


@dataclass
class BenchSpec:
    model: str = "tiny-qwen3"
    layers: str = "all"
    prompts: int = 16
    num_generations: int = 4
    max_new_tokens: int = 24
    learning_rate: float = 1e-4
    difficulty: int = 2  # arith level of the prompts (onelayer.tasks.arith)
    prompt_format: str = "raw"  # raw or fewshot (onelayer.tasks.prompts), rendered into the prompt text
    steps: int = 6
    warmup: int = 2
    threads: int | None = None
    seed: int = 0
    trl_allocator: str = "system"  # TRL as it ships; "retain" gives its process onelayer's allocator setting


# where a model's settings differ from BenchSpec's defaults (which suit the character-level tiny models)
MODEL_SETTINGS: dict[str, dict] = {
    "smollm2-135m": dict(prompts=8, num_generations=8, max_new_tokens=8, learning_rate=1e-5, difficulty=8,
                         prompt_format="fewshot"),
}
PER_MODEL_KEYS = ("prompts", "num_generations", "max_new_tokens", "learning_rate", "difficulty", "prompt_format")


def bench_spec(model: str, **run) -> BenchSpec:
    """The settings both tools use for `model`; `run` sets the run-wide ones (steps, warmup, threads)."""
    return BenchSpec(model=model, **MODEL_SETTINGS.get(model, {}), **run)


# ---------------------------------------------------------------------------------------------- the reward


def digit_share(completion: str) -> float:
    """Share of characters in the completion that are digits (0 for an empty one): a cheap reward with spread."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def trl_digit_reward(prompts, completions, **_columns) -> list[float]:
    """`digit_share` with TRL's reward-function signature."""
    return [digit_share(c) for c in completions]


def register_bench_task() -> None:
    """Arith prompts already rendered in a prompt format (raw or fewshot), scored by `digit_share`; a private
    task name only the benchmark uses. Rendering them here gives both tools the same prompt text with no
    stop string."""
    from onelayer import tasks
    from onelayer.tasks.arith import ArithTask
    from onelayer.tasks.prompts import PromptFormat, formatted

    class DigitShareTask(ArithTask):
        name = "_bench_digits"

        def __init__(self, prompt_format: str = "raw", **opts):
            super().__init__(**opts)
            self._rendered = formatted(ArithTask(**opts), None, PromptFormat(prompt_format))  # no tokenizer: no chat
            self.options = {**self.options, "prompt_format": prompt_format}

        def items(self, split):
            return self._rendered.items(split)

        def score(self, item, completion):
            return digit_share(completion)

        def score_batch(self, items, completions):
            return [digit_share(c) for c in completions]

    if "_bench_digits" not in tasks.registered():
        tasks.register("_bench_digits", DigitShareTask)


def bench_task(spec: BenchSpec):
    """The benchmark's task for `spec`: the same options in both tools and in the FLOP count."""
    from onelayer import tasks

    register_bench_task()
    return tasks.make("_bench_digits", **task_options(spec))


def task_options(spec: BenchSpec) -> dict:
    """The bench task's options for `spec` (what `bench_task` makes it with, and what onelayer's run is given)."""
    return {"difficulty": spec.difficulty, "prompt_format": spec.prompt_format, "seed": spec.seed}
