"""Evaluation of a policy on a task's held-out items: greedy per-item scores (or episode successes for
agent tasks), and sampled pass counts."""

from __future__ import annotations

import torch

from onelayer.rollout import sample_texts
from onelayer.rollout.episodes import play
from onelayer.tasks.agent import is_agent


def task_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Per-item eval scores: greedy completions for single-turn tasks, greedy episodes (won = 1.0) for agents."""
    score = success_scores if is_agent(task) else greedy_scores
    return score(model, tok, task, items, max_new_tokens=max_new_tokens, batch_size=batch_size)


@torch.no_grad()
def greedy_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Score greedy completions of `items`; one float in [0, 1] per item, in order."""
    scores: list[float] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        _, completions = sample_texts(model, tok, [it["prompt"] for it in chunk], num_generations=1,
                                      max_new_tokens=max_new_tokens, greedy=True,
                                      stop_strings=task.stop_strings)
        scores.extend(float(s) for s in task.score_batch(chunk, completions))
    return scores


@torch.no_grad()
def sampled_pass_counts(model, tok, task, items: list[dict], *, n: int, max_new_tokens: int, temperature: float,
                        top_p: float, seed: int, batch_size: int = 256) -> list[int]:
    """For each item, how many of ``n`` sampled completions score 1.0 (the ``c`` of pass@k)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per_batch = max(1, batch_size // n)
    counts: list[int] = []
    for i in range(0, len(items), per_batch):
        chunk = items[i : i + per_batch]
        _, completions = sample_texts(model, tok, [it["prompt"] for it in chunk], num_generations=n,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      generator=gen, stop_strings=task.stop_strings)
        repeated = [it for it in chunk for _ in range(n)]  # sample() groups the n completions of a prompt
        scores = task.score_batch(repeated, completions)
        counts.extend(sum(1 for s in scores[j * n:(j + 1) * n] if s >= 1.0) for j in range(len(chunk)))
    return counts


@torch.no_grad()
def success_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Per item, the share of its evaluation episodes won, in order.

    ``task.eval_samples`` episodes per item, sampled at ``task.eval_temperature`` with a generator seeded by
    ``task.eval_seed`` (so the same model always gets the same score), or one greedy episode when
    ``task.eval_samples`` is 0.
    """
    n = task.eval_samples or 1
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(task.eval_seed)
    per_chunk = max(1, batch_size // n)
    scores: list[float] = []
    for i in range(0, len(items), per_chunk):
        chunk = items[i:i + per_chunk]
        eps = play(model, tok, task, [it["seed"] for it in chunk], num_generations=n, max_new_tokens=max_new_tokens,
                   greedy=not task.eval_samples, temperature=task.eval_temperature, generator=gen)
        scores.extend(sum(eps.won[j * n:(j + 1) * n]) / n for j in range(len(chunk)))
    return scores
