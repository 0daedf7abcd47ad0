"""The multi-turn environment protocol.

An environment is reset from a seed and stepped with action text::

    obs, info = env.reset(seed)                  # info: admissible, anchor, won (+ walkthrough if known)
    obs, reward, done, info = env.step(action)   # info: admissible, anchor, won, valid

``obs`` is text. ``info["admissible"]`` lists the valid action strings in the current state,
``info["anchor"]`` is a hashable, history-free key of the state (GiGPO groups steps of a group's
episodes that share it), ``info["won"]`` says whether the episode was won, and on steps
``info["valid"]`` says whether the action was admissible (an invalid action leaves the state
unchanged). Resetting with the same seed gives the same start state, so the G episodes of a group
start from the same place.
"""

from __future__ import annotations


class EnvError(ValueError):
    """A user-facing environment error (bad option, missing optional dependency); says how to fix it."""


class Env:
    """Base class of text environments. Subclasses set ``name`` and ``options`` and implement
    ``reset`` and ``step``; ``expert_action`` (a correct next action, for warm-start demonstrations)
    is optional."""

    name: str = "env"
    options: dict = {}
    task_description: str = ""  # one line that opens every prompt
    markov: bool = False  # does the obs show the whole state? (then prompts need no history)
    max_turns: int = 20  # default episode limit
    max_action_tokens: int = 8  # completion budget of one action

    def split_key(self, seed: int) -> str:
        """What train/eval splits keep disjoint: seeds with the same key are the same item (default: the seed)."""
        return str(seed)

    def reset(self, seed: int) -> tuple[str, dict]:
        raise NotImplementedError

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        raise NotImplementedError

    def expert_action(self) -> str | None:
        """An action on a shortest path to winning from the current state, or None if unknown."""
        return None

    def close(self) -> None:
        """Release external resources (game processes); the default has none."""
