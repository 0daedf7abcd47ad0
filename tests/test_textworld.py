"""The ``textworld`` environment: generated games, walkthrough replays, determinism, anchors, caching.

Games are generated once into a module-wide temporary cache (about 2-3 s each; six games in all), so every
test that plays one is marked slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("textworld")

from onelayer import envs, tasks  # noqa: E402
from onelayer.envs import EnvError  # noqa: E402
from onelayer.envs import textworld_env as twe  # noqa: E402
from onelayer.envs.textworld_env import CHALLENGES, TextWorldEnv, clean_text  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tw-cache"))


def _check_info(info, *, step: bool):
    assert isinstance(info["admissible"], list) and info["admissible"]
    assert all(isinstance(c, str) and c == c.lower() for c in info["admissible"])
    assert info["admissible"] == sorted(info["admissible"])
    hash(info["anchor"])
    assert isinstance(info["won"], bool)
    if step:
        assert isinstance(info["valid"], bool)
    else:
        assert isinstance(info["walkthrough"], list) and info["walkthrough"]
        assert all(isinstance(c, str) for c in info["walkthrough"])


def _check_obs(obs, limit):
    assert isinstance(obs, str) and 0 < len(obs) <= limit
    assert all(" " <= ch <= "~" for ch in obs)
    assert "$$" not in obs and "___" not in obs and "  " not in obs


@pytest.mark.slow
@pytest.mark.parametrize("challenge,level", [("tw-coin_collector", 1), ("tw-treasure_hunter", 1),
                                             ("tw-simple", 1), ("tw-cooking", 1)])
def test_walkthrough_replay_wins(cache, challenge, level):
    env = TextWorldEnv(challenge=challenge, level=level, seed=0, cache_dir=cache)
    assert env.options == {"challenge": challenge, "level": level, "seed": 0, "max_obs_chars": 600,
                           "cache_dir": cache}
    try:
        obs, info = env.reset(0)
        _check_obs(obs, 600)
        _check_info(info, step=False)
        assert env.expert_action() == info["walkthrough"][0]
        walkthrough = info["walkthrough"]
        for i, action in enumerate(walkthrough):
            obs, reward, done, info = env.step(action)
            _check_obs(obs, 600)
            _check_info(info, step=True)
            assert info["valid"], action
            last = i == len(walkthrough) - 1
            assert done is last and info["won"] is last and reward == (1.0 if last else 0.0)
        assert env.expert_action() is None
        with pytest.raises(RuntimeError):
            env.step("look")
    finally:
        env.close()


@pytest.mark.slow
def test_expert_actions_win_and_obs_is_clean(cache):
    env = envs.make("textworld", challenge="tw-simple", level=1, cache_dir=cache, max_obs_chars=100)
    try:
        obs, info = env.reset(0)
        _check_obs(obs, 100)
        for _ in range(30):
            action = env.expert_action()
            assert action in info["admissible"]
            obs, reward, done, info = env.step(action)
            _check_obs(obs, 100)
            if done:
                break
        assert done and info["won"] and reward == 1.0
    finally:
        env.close()


@pytest.mark.slow
def test_reset_is_deterministic_and_seeds_select_games(cache):
    env = TextWorldEnv(challenge="tw-simple", level=1, cache_dir=cache)
    try:
        obs_a, info_a = env.reset(0)
        env.step(info_a["walkthrough"][0])
        obs_b, info_b = env.reset(0)
        assert (obs_a, info_a) == (obs_b, info_b)
        obs_c, info_c = env.reset(1)  # another game: another food and/or key location
        assert info_c["walkthrough"] != info_a["walkthrough"]
        other = TextWorldEnv(challenge="tw-simple", level=1, cache_dir=cache)
        try:
            assert other.reset(1) == (obs_c, info_c)  # a fresh env gives the same game and start state
        finally:
            other.close()
    finally:
        env.close()
    assert env.game_seed(7) == 7 and TextWorldEnv(seed=2).game_seed(7) == 2 * 100003 + 7
    assert TextWorldEnv(seed=0).game_seed(-1) == 2**32 - 1


@pytest.mark.slow
def test_open_games_are_bounded(cache):
    env = TextWorldEnv(challenge="tw-simple", level=1, cache_dir=cache)
    env.max_open_games = 1
    try:
        first = env.reset(0)
        env.reset(1)
        assert env.reset(0) == first and len(env._games) == 1
    finally:
        env.close()
    assert not env._games


@pytest.mark.slow
def test_anchor_returns_with_the_room(cache):
    env = TextWorldEnv(challenge="tw-treasure_hunter", level=1, cache_dir=cache)
    try:
        _, info = env.reset(0)
        start = info["anchor"]
        moves = [c for c in info["admissible"] if c.startswith("go ")]
        assert moves, info["admissible"]
        _, _, _, info = env.step(moves[0])
        assert info["valid"] and info["anchor"] != start
        back = {"go north": "go south", "go south": "go north", "go east": "go west", "go west": "go east"}[moves[0]]
        _, _, _, info = env.step(back)
        assert info["valid"] and info["anchor"] == start
        # the same actions in a new episode of the same seed meet the same anchors
        _, info2 = env.reset(0)
        assert info2["anchor"] == start
    finally:
        env.close()


@pytest.mark.slow
def test_invalid_action_keeps_anchor(cache):
    env = TextWorldEnv(challenge="tw-coin_collector", level=1, cache_dir=cache)
    try:
        _, info = env.reset(0)
        for bad in ("xyzzy plugh", "take banana", ""):
            obs, reward, done, info2 = env.step(bad)
            assert info2["valid"] is False and reward == 0.0 and not done and not info2["won"]
            assert info2["anchor"] == info["anchor"] and info2["admissible"] == info["admissible"]
            assert obs  # the game's own answer, e.g. "That's not a verb I recognise."
        obs, reward, done, info3 = env.step("  Take   COIN ")  # normalised: case and spaces
        assert info3["valid"] and done and reward == 1.0
    finally:
        env.close()


@pytest.mark.slow
def test_games_are_cached_not_regenerated(cache, monkeypatch):
    env = TextWorldEnv(challenge="tw-coin_collector", level=1, cache_dir=cache)
    path = env.game_file(0)
    mtime = path.stat().st_mtime_ns
    assert path.name == "game.z8" and path.with_suffix(".json").is_file()
    assert not [p for p in path.parent.parent.iterdir() if ".tmp-" in p.name]  # no leftover temp dirs

    def no_generation(*a, **k):
        raise AssertionError("a cached game was generated again")

    monkeypatch.setattr(twe.subprocess, "run", no_generation)
    other = TextWorldEnv(challenge="tw-coin_collector", level=1, cache_dir=cache)
    try:
        other.reset(0)
        assert other.game_file(0) == path and path.stat().st_mtime_ns == mtime
    finally:
        other.close()
    env.close()


def test_default_cache_root_is_onelayer_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    env = TextWorldEnv(challenge="tw-cooking", level=2)
    assert env.game_dir().parent == tmp_path / "textworld"
    assert env.game_settings["take"] == 1 and env.options["cache_dir"] is None


def test_bad_options_are_env_errors():
    with pytest.raises(EnvError) as e:
        TextWorldEnv(challenge="tw-nope")
    for name in CHALLENGES:
        assert name in str(e.value)
    with pytest.raises(EnvError, match="tw-coin_collector"):
        envs.make("textworld", challenge="zork")
    with pytest.raises(EnvError, match="1-30"):
        TextWorldEnv(challenge="tw-treasure_hunter", level=31)
    with pytest.raises(EnvError, match="100 rooms"):
        TextWorldEnv(challenge="tw-coin_collector", level=151)
    with pytest.raises(EnvError, match="1, 2, 3"):
        TextWorldEnv(challenge="tw-simple", level=4)
    with pytest.raises(EnvError):
        TextWorldEnv(challenge="tw-cooking", level=0)
    with pytest.raises(EnvError):
        TextWorldEnv(seed="3")
    with pytest.raises(EnvError):
        TextWorldEnv().reset("0")


def test_task_options_shared_with_the_env_reach_it():
    task = tasks.make("textworld", max_obs_chars=1000, seed=3)
    assert task.env.max_obs_chars == 1000 and task.env.seed == 3  # not the env's own 600 / 0
    assert task.make_env().options["max_obs_chars"] == 1000


def test_missing_textworld_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld", None)  # makes `import textworld` fail
    with pytest.raises(EnvError) as e:
        TextWorldEnv()
    assert "pip install 'onelayer[textworld]'" in str(e.value)
    with pytest.raises(EnvError, match=r"onelayer\[textworld\]"):
        envs.make("textworld", challenge="tw-simple")


def test_module_imports_without_textworld():
    code = ("import sys; sys.modules['textworld'] = None\n"
            "import onelayer.envs as e\n"
            "assert 'textworld' in e.registered()\n"
            "try:\n    e.make('textworld')\nexcept e.EnvError as err:\n    print('ok', err)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "pip install 'onelayer[textworld]'" in out.stdout


def test_clean_text():
    raw = ("\n\n  ________  __\n |        \\|  \\\n  \\$$$$$$$$| $$\n\n"
           "Your task: find the \u2019coin\u2019 \u2014 fast\u2026\n\n-= Cellar =-\nA   cellar.\n\n"
           ">        -= Cellar =-0/1")
    assert clean_text(raw) == "Your task: find the 'coin' - fast... -= Cellar =- A cellar."
    assert clean_text("You win.\n*** The End ***\nWould you like to RESTART, RESTORE?\n> ") == \
        "You win. *** The End ***"
    assert clean_text("caf\u00e9") == "caf?"


@pytest.mark.slow
def test_short_gigpo_run_on_generated_games(tmp_path, monkeypatch):
    """GiGPO end to end on generated TextWorld games (any success rate; here: it runs and logs)."""
    import json

    from onelayer.cli import main

    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    opts = ["challenge=tw-coin_collector", "level=1", "history=0", "max_turns=3", "n_eval=2", "eval_samples=1",
            "max_obs_chars=200"]
    args = ["train", "--task", "textworld", "--algo", "gigpo", "--layers", "all", "--no-warm-start", "--no-progress",
            "--max-steps", "2", "--prompts-per-step", "1", "--num-generations", "3", "--max-completion-length", "16",
            "--check-every", "0",  # the train-split check would generate 50 more games (tested on grid)
            "--out", str(out)]
    for o in opts:
        args += ["--task-opt", o]
    assert main(args) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["task"] == "textworld" and rec["n"] == 2 and 0.0 <= rec["score"] <= 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("anchor_share_in_groups_gt1" in m and "success_rate" in m for m in metrics)
