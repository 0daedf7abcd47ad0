"""``textworld``: generated TextWorld games (Microsoft TextWorld 1.7), played through its Python API.

``make("textworld", challenge="tw-coin_collector", level=1, seed=0)``. Needs ``pip install
'onelayer[textworld]'``; this module imports without it (TextWorld is imported when an environment is
built, and a missing package is an ``EnvError`` that says how to install it).

Challenges and the ``level`` knob
---------------------------------
``tw-coin_collector`` and ``tw-treasure_hunter`` take TextWorld's own level:

* ``tw-coin_collector`` level 1-300: a chain of ``(level - 1) % 100 + 1`` rooms with the coin at the
  far end; levels 101-200 add one dead-end room per chain room, 201-300 two. TextWorld 1.7 caps games
  at 100 rooms, so only levels 1-150 and 201-233 exist. (Level 1 is a single room: every seed gives
  the same game up to wording.)
* ``tw-treasure_hunter`` level 1-30: 1-10 easy (5 rooms, no doors, quest length 1-5), 11-20 medium
  (10 rooms, closed doors and containers), 21-30 hard (20 rooms, locked doors and containers).

``tw-simple`` (a fixed six-room house: find the key, leave the bedroom, fetch the food item named by
the objective and put it on the stove) has two settings, ``rewards`` (how many sub-quests the game
scores) and ``goal`` (how much of the solution the opening objective spells out); the level picks both:

=====  =========  ==========================================
level  rewards    goal
=====  =========  ==========================================
1      dense      detailed (every step of the solution)
2      balanced   brief ("It's only missing a grilled X.")
3      sparse     none (no objective; read the note)
=====  =========  ==========================================

Only ``goal`` changes what the agent sees; ``rewards`` changes the game's own score messages and
sub-quests (this environment's reward ignores the game's score, below).

``tw-cooking`` (the "First TextWorld Problems" cooking games: read the cookbook, gather and prepare
the ingredients, ``prepare meal``, ``eat meal``) has skills; the level enables them step by step
(``drop``, the limited inventory, is never used: TextWorld writes no walkthrough for it):

=====  ======  ====  ===  ====  ====  ===
level  recipe  take  go   open  cook  cut
=====  ======  ====  ===  ====  ====  ===
1      1       0     1    no    no    no
2      1       1     1    no    no    no
3      1       1     1    yes   no    no
4      2       2     6    yes   no    no
5      2       2     6    yes   yes   yes
6      3       3     9    yes   yes   yes
=====  ======  ====  ===  ====  ====  ===

(``recipe``: ingredients in the recipe; ``take``: how many of them must be found (the rest start in
the inventory); ``go``: rooms; ``open``: doors and containers start closed; ``cook`` / ``cut``:
ingredients must be cooked / cut as the recipe says.) ``self.game_settings`` holds the resolved
TextWorld settings; ``self.options`` the constructor options (so ``make(name, **env.options)``
rebuilds the same environment).

Games, seeds and the cache
--------------------------
``reset(seed)`` selects the game: the game seed is ``(self.seed * 100003 + seed) mod 2**32``, so every
reset seed is a different generated game (for small challenges some seeds may still give the same
map), and resetting with the same seed gives the same game from the same start state. Each game is
generated once, offline, and kept under ``<cache>/textworld/<challenge>-L<level>-<digest>/<game
seed>/game.z8`` (``.json`` beside it), where ``<cache>`` is ``$ONELAYER_CACHE`` (default
``~/.cache/onelayer``) or the ``cache_dir`` option and the digest covers the challenge settings and
the TextWorld version. Generation runs TextWorld's challenge maker and compiler in a child Python
process with ``PYTHONHASHSEED=0`` (TextWorld's output depends on set iteration order, so an
unpinned hash seed makes the same seed give different games in different processes); it writes into
a temporary directory renamed into place when complete, under a ``fcntl`` lock, so parallel workers
generate each game once. A seed for which TextWorld cannot build a quest (``tw-treasure_hunter``
sometimes) is retried with ``seed + k * 7919`` for k = 1, 2, ... (deterministic). Generation costs
seconds per game, starting a cached one a fraction of that (README, Tasks). At most ``max_open_games``
(4) started games are kept per environment (least recently used is closed).

Turns
-----
The game is played with TextWorld's ``EnvInfos(admissible_commands, description, inventory, won,
lost, policy_commands, objective, extras=["walkthrough"])``. ``info`` carries ``admissible`` (sorted
admissible commands), ``anchor`` (a SHA-1 digest of the current room description and inventory
text; it leaves out the last feedback, so it is history-free), ``won``, and on steps ``valid``
(whether the action was admissible before the step). An invalid action is still sent to the game,
which answers with its usual feedback (``You can't see any such thing.``), and is recorded as
invalid. Actions are normalised before both: lower-case, one line, single spaces, printable ASCII
(the game ignores case). Every command the environment shows (``admissible``, ``walkthrough``,
``expert_action()``) is normalised the same way (TextWorld writes e.g. ``cook carrot with BBQ``).

The reset info also carries ``walkthrough``: commands that win the game from the start, namely
TextWorld's shortest winning plan at reset (``policy_commands``), else the game's walkthrough
metadata. The two agree for every challenge but ``tw-cooking``, whose hand-written walkthrough has
steps that are not admissible (opening a fridge that is already open); its plan is shorter and
skips reading the cookbook. ``expert_action()`` is the first command of the shortest winning plan
from the current state (``policy_commands``), or None.

Reward: 1.0 on the step that wins the game, else 0.0. The game's intermediate scores are ignored,
so every challenge and level is scored the same way. ``done`` when the game is won or lost (or
TextWorld says it is over); stepping after that is an error (call ``reset``).

``obs`` is the game's text with the banner (ASCII art, and any other line without a letter or
digit), the prompt and status line (``>  -= Kitchen =-0/2``) and the closing "Would you like to
RESTART..." question removed, whitespace collapsed to single spaces, non-ASCII characters replaced
(curly quotes and dashes by their ASCII forms, the rest by ``?``) and cut to its last
``max_obs_chars`` characters. The reset obs is the objective followed by the starting room's
description; a long objective (``tw-simple`` level 1, ``tw-cooking``) can be cut away by the
default 600 characters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

from onelayer.io import cache_root, file_lock, replace_dir

from .base import Env, EnvError

CHALLENGES = ("tw-coin_collector", "tw-treasure_hunter", "tw-simple", "tw-cooking")
SIMPLE_LEVELS = {1: ("dense", "detailed"), 2: ("balanced", "brief"), 3: ("sparse", "none")}
# level: (recipe, take, go, open, cook, cut)
COOKING_LEVELS = {
    1: (1, 0, 1, False, False, False),
    2: (1, 1, 1, False, False, False),
    3: (1, 1, 1, True, False, False),
    4: (2, 2, 6, True, False, False),
    5: (2, 2, 6, True, True, True),
    6: (3, 3, 9, True, True, True),
}
SEED_STRIDE = 100003  # game seed = (seed * SEED_STRIDE + reset seed) mod 2**32
RETRY_STRIDE = 7919  # a seed with no possible quest is retried as seed + k * RETRY_STRIDE
MAX_RETRIES = 20
EMULATOR_SEED = 20180  # the Z-machine's RNG seed (nonzero: Jericho treats 0 as "random")
CACHE_VERSION = 1
INSTALL_HINT = "pip install 'onelayer[textworld]' (or pip install textworld)"

_ASCII_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u2026": "...", "\u00a0": " ",
}
_CLOSING = re.compile(r"Would you like to RESTART.*", re.DOTALL)
_PROMPT = re.compile(r"^>.*$", re.MULTILINE)  # the input prompt and status line: ">   -= Kitchen =-0/2"

# The generator run in a child process: only TextWorld is imported there.
_GENERATOR = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
import textworld, textworld.challenges
from textworld.generator import QuestGenerationError, compile_game
make = textworld.challenges.CHALLENGES[spec["challenge"]][1]
for attempt in range(spec["retries"] + 1):
    options = textworld.GameOptions()
    options.seeds = (spec["seed"] + attempt * spec["retry_stride"]) % 2**32
    options.path = os.path.join(spec["out"], "game.z8")
    options.file_ext = ".z8"
    options.force_recompile = True
    try:
        game = make(settings=dict(spec["settings"]), options=options)
    except QuestGenerationError as e:
        err = e
        continue
    game.metadata["onelayer_seed_attempt"] = attempt
    compile_game(game, options)
    break
else:
    raise SystemExit("no quest could be generated after %d attempts: %s" % (spec["retries"] + 1, err))
"""


def _import_textworld():
    try:
        import textworld  # noqa: F401
    except ImportError as e:
        raise EnvError(f"textworld: the TextWorld package is not installed ({e}); {INSTALL_HINT}") from None
    return textworld


def resolve_settings(challenge: str, level: int) -> dict:
    """TextWorld's challenge settings for ``(challenge, level)`` (see the module docstring)."""
    if challenge not in CHALLENGES:
        raise EnvError(f"textworld: unknown challenge {challenge!r}; valid challenges: {', '.join(CHALLENGES)}")
    if isinstance(level, bool) or not isinstance(level, int):
        raise EnvError(f"textworld: level={level!r} must be an integer")
    if challenge == "tw-coin_collector":
        rooms = ((level - 1) // 100 + 1) * ((level - 1) % 100 + 1)
        if not 1 <= level <= 300 or rooms > 100:
            raise EnvError(f"textworld: tw-coin_collector level={level} is not available; use 1-150 or 201-233 "
                           "(TextWorld 1.7 allows at most 100 rooms)")
        return {"level": level}
    if challenge == "tw-treasure_hunter":
        if not 1 <= level <= 30:
            raise EnvError(f"textworld: tw-treasure_hunter level={level} is not available; use 1-30")
        return {"level": level}
    if challenge == "tw-simple":
        if level not in SIMPLE_LEVELS:
            raise EnvError(f"textworld: tw-simple level={level} is not available; use one of "
                           f"{', '.join(map(str, SIMPLE_LEVELS))}")
        rewards, goal = SIMPLE_LEVELS[level]
        return {"rewards": rewards, "goal": goal, "test": False}
    if level not in COOKING_LEVELS:
        raise EnvError(f"textworld: tw-cooking level={level} is not available; use one of "
                       f"{', '.join(map(str, COOKING_LEVELS))}")
    recipe, take, go, open_, cook, cut = COOKING_LEVELS[level]
    return {"recipe": recipe, "take": take, "go": go, "open": open_, "cook": cook, "cut": cut, "drop": False,
            "recipe_seed": 0, "split": None}


def clean_text(text: str) -> str:
    """Game text without the banner and closing prompt, whitespace collapsed, printable ASCII only."""
    text = _PROMPT.sub("", _CLOSING.sub("", text or ""))
    lines = [ln for ln in text.splitlines() if any(ch.isalnum() for ch in ln)]
    text = " ".join(" ".join(lines).split())
    return "".join(ch if " " <= ch <= "~" else _ASCII_MAP.get(ch, "?") for ch in text)


class TextWorldEnv(Env):
    """Generated TextWorld games (see the module docstring)."""

    name = "textworld"
    task_description = "Play the text game. Reply with one command."
    markov = False  # the obs is the last feedback, not the whole state
    max_action_tokens = 64  # commands like "take red hot pepper from fridge" (about 30-50 characters)
    max_open_games = 4

    def __init__(self, challenge: str = "tw-coin_collector", level: int = 1, seed: int = 0,
                 max_obs_chars: int = 600, cache_dir: str | None = None):
        self.game_settings = resolve_settings(challenge, level)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EnvError(f"textworld: seed={seed!r} must be an integer")
        if isinstance(max_obs_chars, bool) or not isinstance(max_obs_chars, int) or max_obs_chars < 16:
            raise EnvError(f"textworld: max_obs_chars={max_obs_chars!r} must be an integer >= 16")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise EnvError(f"textworld: cache_dir={cache_dir!r} must be a path")
        self._tw = _import_textworld()
        self.challenge, self.level, self.seed, self.max_obs_chars = challenge, level, seed, max_obs_chars
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.options = {"challenge": challenge, "level": level, "seed": seed, "max_obs_chars": max_obs_chars,
                        "cache_dir": self.cache_dir}
        self._infos = self._tw.EnvInfos(admissible_commands=True, description=True, inventory=True, won=True,
                                        lost=True, policy_commands=True, objective=True, extras=["walkthrough"])
        self._games: OrderedDict[str, object] = OrderedDict()  # game file -> started TextWorld env (LRU)
        self._env = None  # the TextWorld env of the current episode
        self._state = None  # its last game state
        self._done = True

    # -- games ------------------------------------------------------------------------------------
    def game_seed(self, reset_seed: int) -> int:
        return (self.seed * SEED_STRIDE + reset_seed) % 2**32

    def game_dir(self) -> Path:
        """The cache folder of this challenge and level (one sub-folder per game seed)."""
        if self.cache_dir is not None:
            root = Path(self.cache_dir).expanduser()
        else:
            root = cache_root()
        key = json.dumps({"v": CACHE_VERSION, "challenge": self.challenge, "settings": self.game_settings,
                          "textworld": getattr(self._tw, "__version__", "?")}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return root / "textworld" / f"{self.challenge}-L{self.level}-{digest}"

    def game_file(self, reset_seed: int) -> Path:
        """The compiled game for ``reset_seed``, generated (once, under a lock) if it is not cached."""
        seed = self.game_seed(reset_seed)
        parent = self.game_dir()
        final = parent / str(seed)
        path = final / "game.z8"
        if path.is_file():
            return path
        with file_lock(parent / f".{seed}.lock"):
            if not path.is_file():
                self._generate(seed, final)
        return path

    def _generate(self, seed: int, final: Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{seed}.tmp-"))
        try:
            spec = {"challenge": self.challenge, "settings": self.game_settings, "seed": seed, "out": str(tmp),
                    "retries": MAX_RETRIES, "retry_stride": RETRY_STRIDE}
            env = dict(os.environ, PYTHONHASHSEED="0")
            tw_parent = str(Path(self._tw.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), tw_parent) if p)
            try:
                proc = subprocess.run([sys.executable, "-c", _GENERATOR, json.dumps(spec)], env=env, cwd=tmp,
                                      capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise EnvError(f"textworld: generating {self.challenge} level {self.level} game {seed} took "
                               "over 600 s") from None
            if proc.returncode != 0 or not (tmp / "game.z8").is_file() or not (tmp / "game.json").is_file():
                tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
                raise EnvError(f"textworld: generating {self.challenge} level {self.level} game {seed} failed "
                               f"(exit {proc.returncode}):\n{tail}")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            replace_dir(tmp, final)  # over a partial leftover, if any (the lock rules out a complete one)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _start(self, path: Path):
        key = str(path)
        env = self._games.get(key)
        if env is not None:
            self._games.move_to_end(key)
            return env
        while len(self._games) >= self.max_open_games:
            _, old = self._games.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        with warnings.catch_warnings():  # Jericho: "not fully supported" (true of every TextWorld game; harmless)
            warnings.simplefilter("ignore")
            env = self._tw.start(key, self._infos)
        env.seed(EMULATOR_SEED)
        self._games[key] = env
        return env

    # -- protocol ---------------------------------------------------------------------------------
    def reset(self, seed: int) -> tuple[str, dict]:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EnvError(f"textworld: reset seed must be an integer, got {seed!r}")
        self._env = self._start(self.game_file(seed))
        state = self._env.reset()
        self._state, self._done = state, False
        info = self._info(state)
        walkthrough = state.get("policy_commands") or state.get("extra.walkthrough") or []
        info["walkthrough"] = [self.normalize(c) for c in walkthrough]
        return self._obs(state.feedback), info

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self._env is None:
            raise RuntimeError("textworld: call reset(seed) before step()")
        if self._done:
            raise RuntimeError("textworld: the episode is over; call reset(seed)")
        command = self.normalize(action)
        valid = command in self._admissible(self._state)
        state, _, game_done = self._env.step(command)
        self._state = state
        won, lost = bool(state.get("won")), bool(state.get("lost"))
        self._done = won or lost or bool(game_done)
        info = self._info(state)
        info["valid"] = valid
        return self._obs(state.feedback), 1.0 if won else 0.0, self._done, info

    def expert_action(self) -> str | None:
        if self._state is None or self._done:
            return None
        plan = self._state.get("policy_commands") or []
        return self.normalize(plan[0]) if plan else None

    def close(self) -> None:
        for env in self._games.values():
            with contextlib.suppress(Exception):
                env.close()
        self._games.clear()
        self._env, self._state, self._done = None, None, True

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def normalize(action: str) -> str:
        """The command sent to the game: lower-case, one line, single spaces, printable ASCII, <= 190 chars."""
        text = " ".join(str(action).lower().split())
        return "".join(ch for ch in text if " " <= ch <= "~")[:190]

    @classmethod
    def _admissible(cls, state) -> list[str]:
        return sorted({cls.normalize(c) for c in (state.get("admissible_commands") or [])})

    def _obs(self, text: str) -> str:
        return clean_text(text)[-self.max_obs_chars:]

    def _info(self, state) -> dict:
        desc = " ".join(str(state.get("description") or "").split())
        inv = " ".join(str(state.get("inventory") or "").split())
        anchor = hashlib.sha1(f"{desc}\n--\n{inv}".encode()).hexdigest()[:16]
        return {"admissible": self._admissible(state), "anchor": anchor, "won": bool(state.get("won"))}
