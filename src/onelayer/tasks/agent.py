"""Agent tasks: a multi-turn environment seen through the task interface the trainer uses.

``tasks.make("grid", difficulty=2, history=1)`` builds an ``AgentTask`` around ``envs.make("grid",
difficulty=2)``: options the environment knows go to it, the rest are the agent's (below); one both
know (``seed`` and ``max_obs_chars`` for ``textworld``) goes to both. An item is a
seed (``{"id": "grid-17", "seed": 17}``); an episode resets the environment with it, and a group's G
episodes all start from that seed.

Prompt of each turn (``prompt()``)::

    {task description}
    {obs of turn t-H}
    > {action of turn t-H}
    ...
    {current obs}
    actions: {admissible actions, comma-separated}
    >

and the completion's first line, stripped, is the action (``parse_action``). An action that is not
admissible is still sent to the environment (which leaves the state unchanged), is recorded as invalid
and costs ``invalid_penalty`` reward. An episode ends when the environment says done or after
``max_turns`` turns.

Evaluation: the score of a held-out seed is the share of ``eval_samples`` episodes won (default 4,
sampled at ``eval_temperature`` 1.0 — the policy RL trains — from a fixed generator seed, so a model's
score is reproducible); ``eval_samples=0`` plays one greedy episode instead. Greedy decoding of a
sampled-trained policy can fall into deterministic loops (README, Tasks).

Options: ``history`` (H, the number of past (observation, action) pairs shown; default 0 for Markov
environments like ``grid``, 2 otherwise), ``max_turns`` (default: the environment's ``max_turns``,
else 20), ``invalid_penalty`` (default 0.1; README, Tasks), ``n_train`` / ``n_eval`` (seeds per split), ``seed``
(which seeds), ``demo_noise`` (share of random actions in warm-start demonstrations, default 0.3),
``max_obs_chars`` (observations are cut to their last N characters in prompts, default 400),
``eval_samples`` / ``eval_temperature`` (above).

Splits are disjoint: a seed is an eval seed when a SHA-256 hash of the environment's ``split_key(seed)``
(the layout, for ``grid``; the seed itself otherwise) is 0 mod 5, so no eval room is ever trained on.
Within a split, seeds with the same key are kept once.
"""

from __future__ import annotations

import logging
import random
from typing import Protocol, runtime_checkable

from onelayer import envs
from onelayer.envs import EnvError

from .base import Task, TaskError, check_seed, check_split, hash_split_is_eval

log = logging.getLogger("onelayer.tasks")
EVAL_MODULUS = 5
AGENT_OPTIONS = ("history", "max_turns", "invalid_penalty", "n_train", "n_eval", "seed", "demo_noise",
                 "max_obs_chars", "eval_samples", "eval_temperature")  # AgentTask's own options


@runtime_checkable
class EpisodicTask(Protocol):
    """What the episode player (``onelayer.rollout.episodes``), the trainer and evaluation need from a
    multi-turn task: environments to play, one turn's prompt, the action in a completion, and how it is
    evaluated. ``AgentTask`` is the implementation; a prompt-format wrapper around one still is one."""

    max_turns: int
    invalid_penalty: float
    eval_samples: int
    eval_temperature: float
    eval_seed: int

    def make_env(self) -> envs.Env: ...

    def prompt(self, history: list[tuple[str, str]], obs: str, admissible: list[str]) -> str: ...

    def parse_action(self, completion: str) -> str: ...


def is_agent(task) -> bool:
    """Is `task` multi-turn (played as episodes) rather than single-turn (one completion per prompt)?"""
    return isinstance(task, EpisodicTask)


class AgentTask(Task):
    """A multi-turn environment as a trainable, evaluable task (see the module docstring)."""
    # an RL step plays 4 seeds x G episodes, one row per turn: fewer, costlier steps at a higher rate, warmed
    # up, with a train-split check every 25 steps that keeps the best weights (README, Tasks: grid)
    train_defaults = {"prompts_per_step": 4, "max_steps": 150, "learning_rate": 1.5e-4, "warmup_steps": 15,
                      "check_every": 25}
    # warm start: 100 held-out seeds per check; stop at 45 % (the band stays 15-60 %). RL from a policy that
    # has only just started to read the board collapsed on grid (28 % -> 6 %): it learnt to wander safely
    warm_start = {"n_heldout": 100, "target": 0.45}

    def __init__(self, env_name: str, *, history: int | None = None, max_turns: int | None = None,
                 invalid_penalty: float = 0.1, n_train: int = 5000, n_eval: int = 200, seed: int = 0,
                 demo_noise: float = 0.3, max_obs_chars: int = 400, eval_samples: int = 4,
                 eval_temperature: float = 1.0, **env_options):
        given = {k: v for k, v in locals().items() if k in AGENT_OPTIONS}
        env_known = envs.options(env_name)
        if env_known is not None:
            for key in env_options:
                if key not in env_known:
                    raise TaskError(f"task {env_name!r} has no option {key!r}; valid options: "
                                    f"{', '.join(sorted({*AGENT_OPTIONS, *env_known}))}")
            # an option both know (textworld: seed, max_obs_chars) is set for both
            env_options.update({k: v for k, v in given.items() if k in env_known})
        try:
            self.env = envs.make(env_name, **env_options)
        except EnvError as e:
            raise TaskError(str(e)) from None
        self.name = env_name
        self.env_options = dict(self.env.options)
        history = (0 if self.env.markov else 2) if history is None else history
        max_turns = max_turns if max_turns is not None else self.env.max_turns
        for key, value, lo in (("history", history, 0), ("max_turns", max_turns, 1), ("n_train", n_train, 0),
                               ("n_eval", n_eval, 0), ("max_obs_chars", max_obs_chars, 16), ("eval_samples", eval_samples, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise TaskError(f"{env_name}: {key}={value!r} must be an integer >= {lo}")
        for key, value in (("invalid_penalty", invalid_penalty), ("demo_noise", demo_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise TaskError(f"{env_name}: {key}={value!r} must be a number in [0, 1]")
        check_seed(env_name, seed)
        if isinstance(eval_temperature, bool) or not isinstance(eval_temperature, (int, float)) or eval_temperature <= 0:
            raise TaskError(f"{env_name}: eval_temperature={eval_temperature!r} must be a positive number")
        self.history, self.max_turns, self.invalid_penalty = history, max_turns, float(invalid_penalty)
        self.n_train, self.n_eval, self.seed, self.demo_noise = n_train, n_eval, seed, float(demo_noise)
        self.max_obs_chars = max_obs_chars
        self.eval_samples, self.eval_temperature, self.eval_seed = eval_samples, float(eval_temperature), seed
        self.options = {**self.env_options, "history": history, "max_turns": max_turns,
                        "invalid_penalty": self.invalid_penalty, "n_train": n_train, "n_eval": n_eval, "seed": seed,
                        "demo_noise": self.demo_noise, "max_obs_chars": max_obs_chars, "eval_samples": eval_samples,
                        "eval_temperature": self.eval_temperature}
        self.max_completion_length = self.env.max_action_tokens
        self._cache: dict[str, list[dict]] = {}

    def make_env(self) -> envs.Env:
        """A fresh environment with this task's options (one per concurrently played episode)."""
        return envs.make(self.name, **self.env_options)

    # -- items ----------------------------------------------------------------------------------
    def _is_eval(self, seed: int) -> tuple[str, bool]:
        key = self.env.split_key(seed)
        return key, hash_split_is_eval(f"{self.name}:{key}", EVAL_MODULUS)

    def items(self, split: str) -> list[dict]:
        check_split(split)
        if split not in self._cache:
            want_eval, n = split == "eval", (self.n_eval if split == "eval" else self.n_train)
            rng = random.Random(f"{self.name}:{self.seed}:{split}")
            chosen, keys, attempts = [], set(), 0
            while len(chosen) < n and attempts < 50 * n + 1000:
                attempts += 1
                s = rng.randrange(2**31)
                key, is_eval = self._is_eval(s)
                if is_eval == want_eval and key not in keys:
                    keys.add(key)
                    chosen.append({"id": f"{self.name}-{s}", "seed": s})
            if len(chosen) < n:
                log.warning("%s: only %d distinct %s seeds found (n_%s=%d); the split has %d items", self.name,
                            len(chosen), split, split, n, len(chosen))
            self._cache[split] = chosen
        return [dict(it) for it in self._cache[split]]

    # -- turns ----------------------------------------------------------------------------------
    def _clip(self, obs: str) -> str:
        return obs if len(obs) <= self.max_obs_chars else obs[-self.max_obs_chars:]

    def prompt(self, history: list[tuple[str, str]], obs: str, admissible: list[str]) -> str:
        """The prompt of one turn; ``history`` holds all past (obs, action) pairs, the last H are shown."""
        parts = [self.env.task_description] if self.env.task_description else []
        for past_obs, action in history[-self.history:] if self.history else []:
            parts += [self._clip(past_obs), f"> {action}"]
        parts += [self._clip(obs), "actions: " + ",".join(admissible), "> "]
        return "\n".join(parts)

    @staticmethod
    def parse_action(completion: str) -> str:
        lines = completion.strip().splitlines()
        return lines[0].strip() if lines else ""

    def score(self, item: dict, completion: str) -> float:
        raise TypeError(f"{self.name} is an agent task: episodes are scored by playing them "
                        "(onelayer.rollout.episodes), not single completions")

    # -- warm start -----------------------------------------------------------------------------
    def sft_pairs(self, items: list[dict]) -> list[tuple[str, str]]:
        """(prompt, action) pairs from one noisy expert episode per item: the expert's action, except
        that with probability ``demo_noise`` a random admissible action is taken (and recorded)."""
        env, pairs = self.make_env(), []
        rng = random.Random(f"{self.name}:{self.seed}:demos")
        try:
            for it in items:
                obs, info = env.reset(it["seed"])
                history: list[tuple[str, str]] = []
                for _ in range(self.max_turns):
                    expert = env.expert_action()
                    if expert is None or not info["admissible"]:
                        break
                    action = rng.choice(info["admissible"]) if rng.random() < self.demo_noise else expert
                    pairs.append((self.prompt(history, obs, info["admissible"]), action))
                    history.append((obs, action))
                    obs, _, done, info = env.step(action)
                    if done:
                        break
        finally:
            env.close()
        return pairs


def agent_task_factory(env_name: str):
    """A task factory for ``env_name`` (registered in the task registry under the same name)."""

    def factory(**options) -> AgentTask:
        return AgentTask(env_name, **options)

    factory.__name__ = f"{env_name}_task"
    return factory
