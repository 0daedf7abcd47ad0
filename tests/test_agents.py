"""Agent tasks: the grid environment, the env protocol, multi-turn rollout rows and their advantages."""

import json

import pytest
import torch

from onelayer import envs, tasks
from onelayer.algos import get_preset
from onelayer.cli import main
from onelayer.models import build_tiny
from onelayer.policy import sequence_logprobs
from onelayer.rollout import sample
from onelayer.rollout.episodes import merge_batches, play
from onelayer.train.experience import Experience, advantages


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_grid_protocol_and_expert_wins(difficulty):
    env = envs.make("grid", difficulty=difficulty)
    for seed in range(20):
        obs, info = env.reset(seed)
        assert set(info) >= {"admissible", "anchor", "won"} and not info["won"]
        assert info["admissible"] and set(info["admissible"]) <= {"up", "down", "left", "right"}
        assert obs == env.reset(seed)[0]  # same seed, same start
        for _ in range(30):
            obs, reward, done, info = env.step(env.expert_action())
            assert info["valid"]
            if done:
                break
        assert done and info["won"] and reward == 1.0


def test_grid_invalid_action_and_anchor_recurrence():
    env = envs.make("grid", difficulty=2)
    obs, info = env.reset(3)
    blocked = next(m for m in ("up", "down", "left", "right") if m not in info["admissible"])
    obs2, reward, done, info2 = env.step(blocked)
    assert not info2["valid"] and obs2 == obs and info2["anchor"] == info["anchor"] and reward == 0.0 and not done
    move = info["admissible"][0]
    back = {"up": "down", "down": "up", "left": "right", "right": "left"}[move]
    _, _, _, moved = env.step(move)
    if back in moved["admissible"] and not moved["won"]:
        _, _, _, returned = env.step(back)
        assert returned["anchor"] == info["anchor"]  # the same state, whatever the history


def test_grid_key_level_needs_the_key():
    env = envs.make("grid", difficulty=3)
    obs, info = env.reset(11)
    assert "k" in obs and "D" in obs
    while True:
        obs, _, done, info = env.step(env.expert_action())
        if "k" not in obs:
            break
    assert "G" in obs and "D" not in obs


def test_env_registry_errors():
    with pytest.raises(envs.EnvError, match="registered environments"):
        envs.make("nope")
    with pytest.raises(envs.EnvError, match="no option 'size'"):
        envs.make("grid", size=3)
    with pytest.raises(envs.EnvError, match="difficulty=7"):
        envs.make("grid", difficulty=7)
    with pytest.raises(tasks.TaskError, match="history=-1"):
        tasks.make("grid", history=-1)
    # a misspelt option names the agent's options as well as the environment's
    with pytest.raises(tasks.TaskError, match="no option 'histroy'; valid options: .*difficulty.*history"):
        tasks.make("grid", histroy=1)


def test_agent_options_match_the_signature():
    import inspect

    from onelayer.tasks.agent import AGENT_OPTIONS, AgentTask

    params = inspect.signature(AgentTask.__init__).parameters.values()
    assert sorted(AGENT_OPTIONS) == sorted(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def test_too_few_distinct_seeds_is_logged(caplog):
    task = tasks.make("grid", difficulty=1, n_train=300, n_eval=10)  # difficulty 1 has fewer than 300 layouts
    with caplog.at_level("WARNING", logger="onelayer.tasks"):
        n = len(task.items("train"))
    assert n < 300 and f"only {n} distinct train seeds found (n_train=300)" in caplog.text


def test_agent_task_splits_prompts_and_demos():
    task = tasks.make("grid", n_train=300, n_eval=60, history=1)
    train, ev = task.items("train"), task.items("eval")
    assert len(train) == 300 and len(ev) == 60
    env = task.make_env()
    layouts = lambda items: {env.split_key(it["seed"]) for it in items}  # noqa: E731
    assert not layouts(train) & layouts(ev) and len(layouts(train)) == 300
    obs, info = env.reset(train[0]["seed"])
    prompt = task.prompt([("old obs", "up")], obs, info["admissible"])
    assert prompt.startswith("Reach G.\nold obs\n> up\n") and prompt.endswith("actions: " + ",".join(info["admissible"]) + "\n> ")
    assert task.parse_action("  left \nright") == "left"
    pairs = task.sft_pairs(train[:20])
    assert len(pairs) >= 20 and all(a in ("up", "down", "left", "right") for _, a in pairs)


def test_play_rows_carry_ids_anchors_and_match_logprobs():
    torch.manual_seed(0)
    model, tok = build_tiny("tiny-qwen3", seed=0)
    task = tasks.make("grid", max_turns=3, n_train=10, n_eval=5)
    seeds = [it["seed"] for it in task.items("train")[:2]]
    eps = play(model, tok, task, seeds, num_generations=3, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    S = len(eps.anchors)
    assert eps.batch.input_ids.shape[0] == S == len(eps.step_rewards) == sum(eps.lengths)
    assert set(eps.traj_ids.tolist()) == set(range(6)) and eps.group_ids.tolist().count(0) == sum(eps.lengths[:3])
    # a random model mostly writes invalid actions: each costs the penalty
    for r, ok in zip(eps.step_rewards.tolist(), eps.valid):
        assert r == pytest.approx(0.0 if ok else -0.1) or r == pytest.approx(1.0)
    # episodes of a group start in the same state
    first_rows = {e: i for i, e in reversed(list(enumerate(eps.traj_ids.tolist())))}
    assert len({eps.anchors[first_rows[e]] for e in range(3)}) == 1
    # the merged batch's behaviour log-probs match a full forward of the merged sequences
    logp = sequence_logprobs(model, eps.batch.input_ids, eps.batch.attention_mask, eps.batch.prompt_len)
    mask = eps.batch.completion_mask.bool()
    assert torch.allclose(logp[mask], eps.batch.logprobs[mask], atol=1e-5)


def test_merge_batches_pads_both_sides():
    model, tok = build_tiny("tiny-qwen3", seed=0)
    a = sample(model, [[5, 6, 7]], max_new_tokens=2, eos_id=None, pad_id=0)
    b = sample(model, [[5, 6, 7, 8, 9]], max_new_tokens=4, eos_id=None, pad_id=0)
    m = merge_batches([a, b], pad_id=0)
    assert m.prompt_len == 5 and m.input_ids.shape == (2, 9)
    assert m.input_ids[0].tolist()[:2] == [0, 0] and m.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert m.completion_mask[0].tolist() == [1, 1, 0, 0]


def test_episode_level_advantages_for_grpo_and_gigpo_on_rows():
    # two groups; group 0: episode 0 wins in 2 steps, episode 1 fails in 2; group 1: one episode of one step
    exp = Experience(batch=None, step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
                     traj_ids=torch.tensor([0, 0, 1, 1, 2]), group_ids=torch.tensor([0, 0, 0, 0, 1]),
                     anchors=["s0", "s1", "s0", "s2", "t0"], metrics={})
    grpo = advantages(exp, get_preset("dr_grpo"), "none", balance_episodes=False)
    assert grpo.tolist() == pytest.approx([0.5, 0.5, -0.5, -0.5, 0.0])
    gigpo = advantages(exp, get_preset("gigpo"), "none", balance_episodes=False)
    # episode term ±0.5; step term: anchor (0, s0) holds returns 0.95 and 0 → ±0.475; others singletons
    assert gigpo.tolist() == pytest.approx([0.5 + 0.475, 0.5, -0.5 - 0.475, -0.5, 0.0])
    # balanced: each row × S / (E · len(episode)) = 5 / (3 · 2) for the two-step episodes
    balanced = advantages(exp, get_preset("gigpo"), "none")
    assert balanced.tolist() == pytest.approx([(0.5 + 0.475) * 5 / 6, 0.5 * 5 / 6, (-0.5 - 0.475) * 5 / 6, -0.5 * 5 / 6, 0.0])
    single = Experience(batch=None, step_rewards=torch.tensor([1.0, 0.0, 1.0]), traj_ids=torch.arange(3),
                        group_ids=torch.tensor([0, 0, 0]), anchors=[0, 0, 0], metrics={})
    assert torch.equal(advantages(single, get_preset("grpo"), "group"),
                       advantages(single, get_preset("grpo"), "group", balance_episodes=False))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gigpo", "grpo"])
def test_train_and_eval_on_grid_end_to_end(tmp_path, onelayer_cache, algo):
    out = tmp_path / algo
    common = ["--task", "grid", "--task-opt", "n_eval=20", "--task-opt", "max_turns=4", "--no-warm-start", "--no-progress"]
    assert main(["train", "--out", str(out), *common, "--algo", algo, "--layers", "middle:1", "--max-steps", "2",
                 "--num-generations", "4", "--prompts-per-step", "2"]) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["n"] == 20 and rec["task"] == "grid" and rec["frozen_unchanged"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"success_rate", "anchor_share_in_groups_gt1", "invalid_rate", "episode_len", "reward_std"} <= set(metrics[0])
    assert all(m["rollout_s"] > 0 and m["reward_s"] > 0 for m in metrics)  # environment time is not counted twice
    assert all(m["rollout_s"] + m["reward_s"] + m["logprob_s"] + m["update_s"] <= m["seconds"] for m in metrics)
    assert main(["eval", "--model", str(out / "model"), *common[:6], "--out", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["n"] == 20


def test_merged_turns_share_equal_prompts():
    """Rows of merged turns with the same prompt get one prompt index, and the training forward that runs
    such a prompt once gives each row the log-probs and the gradients of running every row on its own."""
    from helpers import PAD, PROMPTS, assert_close, assert_grads_close, build, logprobs_and_grads

    model = build("qwen3")
    kw = dict(num_generations=1, max_new_tokens=5, temperature=0.9, eos_id=1, pad_id=PAD)
    turns = [sample(model, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], generator=torch.Generator().manual_seed(0), **kw),
             sample(model, [PROMPTS[1], PROMPTS[2]], generator=torch.Generator().manual_seed(1), **kw)]
    batch = merge_batches(turns, PAD)
    index = batch.prompt_index.tolist()
    assert index[0] == index[2] and index[1] == index[3] and len(set(index)) == 3
    shared, g_shared = logprobs_and_grads(model, batch, prompt_index=batch.prompt_index)
    alone, g_alone = logprobs_and_grads(model, batch, prompt_index=torch.arange(len(index)))
    assert_close(shared, alone, batch.completion_mask)
    assert_close(shared, batch.logprobs, batch.completion_mask)
    assert_grads_close(g_shared, g_alone)
