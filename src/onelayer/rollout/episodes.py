"""Multi-turn rollout: play groups of episodes of an agent task in lockstep with the policy.

Each turn, the prompts of every episode still running are sampled as one batch (``sample``), the
completions are parsed into actions and stepped in their environments. Every turn of every episode is
one training row that carries its episode id, its group id (the seed it started from), the anchor of
the state where it acted, its reward, and its prompt / completion / behaviour log-probs. The rows of
all turns are then merged into one padded ``RolloutBatch`` for the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onelayer.rollout.batch import RolloutBatch
from onelayer.rollout.sampling import decode_completions, encode_prompts, sample


@dataclass
class Episodes:
    """Played episodes, one row per turn (rows are grouped by turn, then by episode)."""

    batch: RolloutBatch | None  # the turns' prompts + completions; None when nothing was played
    step_rewards: torch.Tensor  # FloatTensor[S]: env reward − invalid penalty
    traj_ids: torch.Tensor  # LongTensor[S]: episode of each row
    group_ids: torch.Tensor  # LongTensor[S]: group (start seed) of each row
    anchors: list  # S history-free state keys
    valid: list[bool]
    won: list[bool]  # per episode
    returns: list[float]  # per episode: sum of its step rewards
    lengths: list[int]  # per episode: turns played
    env_seconds: float = 0.0  # time spent in the environments (the reward phase of an agent step)


def play(model, tok, task, seeds: list[int], *, num_generations: int, max_new_tokens: int, greedy: bool = False,
         temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
         sample_fn=sample) -> Episodes:
    """Play ``num_generations`` episodes from each seed (group g = ``seeds[g]``) until done or ``task.max_turns``.

    ``sample_fn`` samples each turn's actions (``rollout.sample`` or a drop-in such as the vLLM sampler)."""
    n_eps = len(seeds) * num_generations
    group_of = [g for g in range(len(seeds)) for _ in range(num_generations)]
    env_list = [task.make_env() for _ in range(n_eps)]
    obs, infos = [], []
    env_seconds = 0.0
    try:
        for e, env in enumerate(env_list):
            o, info = env.reset(seeds[group_of[e]])
            obs.append(o)
            infos.append(info)
        history: list[list[tuple[str, str]]] = [[] for _ in range(n_eps)]
        done = [False] * n_eps
        won, returns, lengths = [False] * n_eps, [0.0] * n_eps, [0] * n_eps
        turn_batches: list[RolloutBatch] = []
        rows: list[tuple[int, float, object, bool]] = []  # (episode, reward, anchor, valid)
        for _ in range(task.max_turns):
            active = [e for e in range(n_eps) if not done[e]]
            if not active:
                break
            prompts = [task.prompt(history[e], obs[e], infos[e]["admissible"]) for e in active]
            batch = sample_fn(model, encode_prompts(tok, prompts), num_generations=1,
                           max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=generator)
            turn_batches.append(batch)
            for e, text in zip(active, decode_completions(tok, batch.completion_ids, batch.completion_mask)):
                action = task.parse_action(text)
                anchor = infos[e]["anchor"]
                t0 = time.perf_counter()
                o, reward, finished, info = env_list[e].step(action)
                env_seconds += time.perf_counter() - t0
                valid = bool(info.get("valid", True))
                reward = float(reward) - (0.0 if valid else task.invalid_penalty)
                rows.append((e, reward, anchor, valid))
                history[e].append((obs[e], action))
                obs[e], infos[e] = o, info
                returns[e] += reward
                lengths[e] += 1
                won[e] = bool(info.get("won", False))
                done[e] = bool(finished)
    finally:
        for env in env_list:
            env.close()
    return Episodes(
        batch=merge_batches(turn_batches, tok.pad_token_id) if turn_batches else None,
        step_rewards=torch.tensor([r[1] for r in rows], dtype=torch.float32),
        traj_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        group_ids=torch.tensor([group_of[r[0]] for r in rows], dtype=torch.long),
        anchors=[r[2] for r in rows], valid=[r[3] for r in rows],
        won=won, returns=returns, lengths=lengths, env_seconds=env_seconds,
    )


def merge_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One RolloutBatch from several: prompts left-padded to the widest, completions right-padded; rows with
    the same (padded) prompt get the same `prompt_index`."""
    P = max(b.prompt_len for b in batches)
    T = max(b.completion_ids.shape[1] for b in batches)
    ids, att, comp, cmask, logp = [], [], [], [], []
    for b in batches:
        B, p, t = b.input_ids.shape[0], b.prompt_len, b.completion_ids.shape[1]
        left, right = P - p, T - t
        ids.append(torch.cat([b.input_ids.new_full((B, left), pad_id), b.input_ids,
                              b.input_ids.new_full((B, right), pad_id)], dim=1))
        att.append(torch.cat([b.attention_mask.new_zeros((B, left)), b.attention_mask,
                              b.attention_mask.new_zeros((B, right))], dim=1))
        comp.append(torch.cat([b.completion_ids, b.completion_ids.new_full((B, right), pad_id)], dim=1))
        cmask.append(torch.cat([b.completion_mask, b.completion_mask.new_zeros((B, right))], dim=1))
        logp.append(torch.cat([b.logprobs, b.logprobs.new_zeros((B, right))], dim=1))
    input_ids, attention_mask = torch.cat(ids), torch.cat(att)
    # rows with the same prompt (episodes that reached the same state) share an index: the training forward
    # runs that prompt once for all of them
    _, prompt_index = torch.unique(torch.cat([input_ids[:, :P], attention_mask[:, :P]], 1), dim=0, return_inverse=True)
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, prompt_len=P, completion_ids=torch.cat(comp),
        completion_mask=torch.cat(cmask), logprobs=torch.cat(logp),
        completion_lengths=torch.cat([b.completion_lengths for b in batches]), prompt_index=prompt_index,
    )
