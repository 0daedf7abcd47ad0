"""``grid``: a seeded key-and-door grid world rendered as text, small enough for a tiny model on CPU.

The agent ``@`` walks a walled room with ``up`` / ``down`` / ``left`` / ``right`` and wins by reaching
the goal ``G``. At level 3 the goal is a locked door ``D``: the agent must first step on the key ``k``,
which opens it (the door is then drawn as ``G``). Inner walls are ``#``, floor ``.``; the room's outer
wall is not drawn (the admissible actions say where it is)::

    @...
    .#.k
    ..#D
    ....

=====  ==========  ==============  ===========
level  interior    inner walls     key + door
=====  ==========  ==============  ===========
1      4 x 4       0               no
2      4 x 4       2               no
3      4 x 4       2               yes
=====  ==========  ==============  ===========

``reset(seed)`` builds the layout from the seed alone (the same seed gives the same room, so the G
episodes of a group share it, and states recur across them: the anchor is the rendered grid, which
is history-free). Layouts are redrawn until the goal is reachable and at least 2 moves away.
Admissible actions are the moves that do not hit a wall or a locked door; any other action is
invalid and leaves the state unchanged. Reward: 1.0 on the step that reaches the goal, else 0.0.
``expert_action`` follows a breadth-first shortest path.
"""

from __future__ import annotations

import random
from collections import deque

from .base import Env, EnvError

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
LEVELS = {1: (4, 0, False), 2: (4, 2, False), 3: (4, 2, True)}  # interior size, inner walls, key


class GridEnv(Env):
    """A seeded key-and-door grid (see the module docstring)."""

    name = "grid"
    task_description = "Reach G."
    markov = True  # the drawn grid is the whole state
    max_turns = 12  # default episode limit (the longest shortest path at level 3 is about 10)

    def __init__(self, difficulty: int = 2):
        if isinstance(difficulty, bool) or difficulty not in LEVELS:
            raise EnvError(f"grid: difficulty={difficulty!r} is not a level; use one of {', '.join(map(str, LEVELS))}")
        self.difficulty = difficulty
        self.options = {"difficulty": difficulty}
        self.size, self.n_walls, self.has_key_level = LEVELS[difficulty]
        self._state = None

    # -- layout ---------------------------------------------------------------------------------
    def _layout(self, seed: int):
        rng = random.Random(f"grid:{self.difficulty}:{seed}")
        n = self.size
        cells = [(r, c) for r in range(1, n + 1) for c in range(1, n + 1)]
        while True:
            picks = rng.sample(cells, self.n_walls + 2 + (1 if self.has_key_level else 0))
            walls = frozenset(picks[: self.n_walls])
            agent, goal = picks[self.n_walls], picks[self.n_walls + 1]
            key = picks[self.n_walls + 2] if self.has_key_level else None
            layout = (walls, goal, key)
            path = _shortest(layout, n, (agent, key is None))
            if path is not None and len(path) >= 2:
                return layout, agent

    # -- protocol -------------------------------------------------------------------------------
    def reset(self, seed: int) -> tuple[str, dict]:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EnvError(f"grid: reset seed must be an integer, got {seed!r}")
        layout, agent = self._layout(seed)
        self._state = {"layout": layout, "pos": agent, "key": layout[2] is None, "won": False}
        return self._obs(), self._info()

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._state is None:
            raise RuntimeError("grid: call reset(seed) before step()")
        st = self._state
        if st["won"]:
            raise RuntimeError("grid: the episode is over; call reset(seed)")
        move = action.strip().lower()
        valid = move in self._admissible()
        reward = 0.0
        if valid:
            st["pos"] = _moved(st["pos"], move)
            walls, goal, key = st["layout"]
            if st["pos"] == key:
                st["key"] = True
            if st["pos"] == goal:
                st["won"], reward = True, 1.0
        info = self._info()
        info["valid"] = valid
        return self._obs(), reward, st["won"], info

    def expert_action(self) -> str | None:
        st = self._state
        if st is None or st["won"]:
            return None
        path = _shortest(st["layout"], self.size, (st["pos"], st["key"]))
        return path[0] if path else None

    # -- helpers --------------------------------------------------------------------------------
    def _admissible(self) -> list[str]:
        st = self._state
        walls, goal, _ = st["layout"]
        return [m for m in MOVES if _passable(_moved(st["pos"], m), walls, goal, st["key"], self.size)]

    def _obs(self) -> str:
        st = self._state
        walls, goal, key = st["layout"]
        n = self.size
        rows = []
        for r in range(1, n + 1):
            row = []
            for c in range(1, n + 1):
                cell = (r, c)
                if cell == st["pos"]:
                    row.append("@")
                elif cell in walls:
                    row.append("#")
                elif cell == goal:
                    row.append("G" if st["key"] else "D")
                elif cell == key and not st["key"]:
                    row.append("k")
                else:
                    row.append(".")
            rows.append("".join(row))
        return "\n".join(rows)

    def split_key(self, seed: int) -> str:
        """The layout a seed gives: agent tasks split train/eval by it, so no eval room is trained on."""
        layout, agent = self._layout(seed)
        return repr((sorted(layout[0]), layout[1], layout[2], agent))

    def _info(self) -> dict:
        return {"admissible": self._admissible(), "anchor": self._obs(), "won": self._state["won"]}


def _moved(pos, move):
    dr, dc = MOVES[move]
    return pos[0] + dr, pos[1] + dc


def _passable(cell, walls, goal, has_key, n) -> bool:
    r, c = cell
    if not (1 <= r <= n and 1 <= c <= n) or cell in walls:
        return False
    return cell != goal or has_key


def _shortest(layout, n, start) -> list[str] | None:
    """Moves of a shortest winning path from state ``start = (pos, has_key)``, or None."""
    walls, goal, key = layout
    queue, seen = deque([start]), {start: None}
    while queue:
        pos, has_key = state = queue.popleft()
        if pos == goal:
            moves = []
            while seen[state] is not None:
                state, move = seen[state]
                moves.append(move)
            return moves[::-1]
        for move in MOVES:
            nxt = _moved(pos, move)
            if _passable(nxt, walls, goal, has_key, n):
                nstate = (nxt, has_key or nxt == key)
                if nstate not in seen:
                    seen[nstate] = (state, move)
                    queue.append(nstate)
    return None
