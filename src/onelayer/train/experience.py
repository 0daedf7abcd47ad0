"""One RL step's experience, for single-turn and agent tasks alike, and its advantages.

``collect`` samples it: for a single-turn task, G completions per prompt, each a one-step episode
whose group is its prompt; for an agent task, G episodes per seed (``onelayer.rollout.episodes``),
one row per turn. ``advantages`` then applies the algorithm's registered estimator (``onelayer.algos.ADVANTAGES``):
GRPO / Dr. GRPO use episode-level group advantages (an episode's return against its group's, given to
each of its rows); GiGPO adds the anchor-state step-level term.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onelayer.algos import ADVANTAGES, anchor_group_stats, episode_returns
from onelayer.rollout import RolloutBatch, sample, sample_texts
from onelayer.rollout.episodes import play
from onelayer.tasks.agent import is_agent


@dataclass
class Experience:
    batch: RolloutBatch  # one row per (episode, turn)
    step_rewards: torch.Tensor  # FloatTensor[S]
    traj_ids: torch.Tensor  # LongTensor[S]
    group_ids: torch.Tensor  # LongTensor[S]
    anchors: list  # S hashable state keys
    metrics: dict  # reward_mean / reward_std over episode returns, phase times, for agents success / anchors


def collect(model, tok, task, items: list[dict], *, num_generations: int, max_new_tokens: int, temperature: float,
            top_p: float, generator: torch.Generator, capture_block: int | None = None,
            block_path: str | None = None, sample_fn=sample) -> Experience:
    """Sample and score one step's experience with `sample_fn` (`rollout.sample` or a drop-in such as the
    vLLM sampler). `capture_block`: also keep the hidden states entering that block (frozen-prefix reuse;
    single-turn rollouts with `rollout.sample` capture them while sampling, episodes do not)."""
    t0 = time.perf_counter()
    if is_agent(task):
        eps = play(model, tok, task, [it["seed"] for it in items], num_generations=num_generations,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
                   sample_fn=sample_fn)
        n = len(eps.won)
        metrics = {**_mean_std(torch.tensor(eps.returns, dtype=torch.float32)), "success_rate": sum(eps.won) / n,
                   "episode_len": sum(eps.lengths) / n, "invalid_rate": 1 - sum(eps.valid) / max(1, len(eps.valid)),
                   # the environment's time is the reward phase; the rest of the episodes is rollout
                   "rollout_s": time.perf_counter() - t0 - eps.env_seconds, "reward_s": eps.env_seconds,
                   **{f"anchor_{k}": v for k, v in anchor_group_stats(eps.group_ids, eps.anchors).items()}}
        return Experience(eps.batch, eps.step_rewards, eps.traj_ids, eps.group_ids, eps.anchors, metrics)
    capture = {"capture_block": capture_block, "block_path": block_path} if capture_block is not None else {}
    batch, completions = sample_texts(model, tok, [it["prompt"] for it in items], sample_fn=sample_fn,
                                      stop_strings=task.stop_strings, num_generations=num_generations,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      generator=generator, **capture)
    t1 = time.perf_counter()
    group = batch.prompt_index.cpu()
    rewards = torch.tensor(task.score_batch([items[i] for i in group.tolist()], completions), dtype=torch.float32)
    return Experience(batch, rewards, torch.arange(len(rewards)), group, group.tolist(),
                      {**_mean_std(rewards), "rollout_s": t1 - t0, "reward_s": time.perf_counter() - t1})


def _mean_std(returns: torch.Tensor) -> dict:
    """reward_mean and reward_std over the step's episodes (returns, one per episode)."""
    return {"reward_mean": returns.mean().item(), "reward_std": returns.std().item() if len(returns) > 1 else 0.0}


def advantages(exp: Experience, preset, scale: str, balance_episodes: bool = True,
               estimator: str | None = None) -> torch.Tensor:
    """Per-row advantages of ``exp`` by the preset's registered estimator (``onelayer.algos.ADVANTAGES``;
    ``estimator`` overrides it) under reward scaling ``scale``; the preset also supplies the estimator's
    constants (GiGPO's gamma and omega).

    ``balance_episodes`` weights each row by S / (E · len(its episode)) (S rows, E episodes), so every
    episode carries the same total weight in the loss whatever its length. Without it, long failing
    episodes outnumber short successful ones row for row, the advantages of a batch sum to a large
    negative value, and the update pushes probability away from the sampled actions in general (towards
    untaken, mostly invalid ones). The policy-gradient term is linear in the advantage and the clip
    depends only on its sign, so this is exactly a per-episode mean of the loss. Single-turn episodes
    have length 1: weight 1, no change.
    """
    adv = ADVANTAGES[estimator or preset.advantage].fn(exp.step_rewards, exp.traj_ids, exp.group_ids, exp.anchors, scale=scale,
                                   preset=preset)
    if balance_episodes and len(adv):
        _, _, inverse = episode_returns(exp.step_rewards, exp.traj_ids, exp.group_ids)
        lengths = torch.bincount(inverse)
        adv = adv * (len(adv) / (len(lengths) * lengths[inverse].float()))
    return adv
