"""Evaluation of a policy on a task's held-out items: greedy per-item scores (or episode successes for
agent tasks) with the answers a majority vote compares (`Task.answer`), and sampled completions' scores,
answers and pass counts."""

from __future__ import annotations

import torch

from onelayer.rollout import sample_texts
from onelayer.rollout.episodes import play
from onelayer.tasks.agent import is_agent


def task_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Per-item eval scores: greedy completions for single-turn tasks, greedy episodes (won = 1.0) for agents."""
    score = success_scores if is_agent(task) else greedy_scores
    return score(model, tok, task, items, max_new_tokens=max_new_tokens, batch_size=batch_size)


def task_results(model, tok, task, items: list[dict], *, max_new_tokens: int,
                 batch_size: int = 256) -> tuple[list[float], list[str] | None]:
    """`task_scores` and, for single-turn tasks, each item's greedy answer (agent tasks: None, an episode has
    no single answer)."""
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    if is_agent(task):
        return success_scores(model, tok, task, items, **kw), None
    return greedy_answers(model, tok, task, items, **kw)


@torch.no_grad()
def _greedy_chunks(model, tok, task, items: list[dict], max_new_tokens: int, batch_size: int):
    """(items, their greedy completions) per generation batch."""
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        _, completions = sample_texts(model, tok, [it["prompt"] for it in chunk], num_generations=1,
                                      max_new_tokens=max_new_tokens, greedy=True,
                                      stop_strings=task.stop_strings)
        yield chunk, completions


def greedy_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Score greedy completions of `items`; one float in [0, 1] per item, in order."""
    return [float(s) for chunk, completions in _greedy_chunks(model, tok, task, items, max_new_tokens, batch_size)
            for s in task.score_batch(chunk, completions)]


def greedy_answers(model, tok, task, items: list[dict], *, max_new_tokens: int,
                   batch_size: int = 256) -> tuple[list[float], list[str]]:
    """`greedy_scores` and each item's answer (`task.answer` of its greedy completion), in order."""
    scores: list[float] = []
    answers: list[str] = []
    for chunk, completions in _greedy_chunks(model, tok, task, items, max_new_tokens, batch_size):
        scores.extend(float(s) for s in task.score_batch(chunk, completions))
        answers.extend(task.answer(it, c) for it, c in zip(chunk, completions))
    return scores, answers


@torch.no_grad()
def _sampled_chunks(model, tok, task, items: list[dict], n: int, max_new_tokens: int, temperature: float,
                    top_p: float, seed: int, batch_size: int):
    """(items, each item repeated n times, their sampled completions) per generation batch, from one generator
    seeded with `seed`."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per_batch = max(1, batch_size // n)
    for i in range(0, len(items), per_batch):
        chunk = items[i : i + per_batch]
        _, completions = sample_texts(model, tok, [it["prompt"] for it in chunk], num_generations=n,
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      generator=gen, stop_strings=task.stop_strings)
        yield chunk, [it for it in chunk for _ in range(n)], completions  # sample() groups a prompt's n completions


def sampled_pass_counts(model, tok, task, items: list[dict], *, n: int, max_new_tokens: int, temperature: float,
                        top_p: float, seed: int, batch_size: int = 256) -> list[int]:
    """For each item, how many of ``n`` sampled completions score 1.0 (the ``c`` of pass@k)."""
    counts: list[int] = []
    for chunk, repeated, completions in _sampled_chunks(model, tok, task, items, n, max_new_tokens, temperature,
                                                        top_p, seed, batch_size):
        scores = task.score_batch(repeated, completions)
        counts.extend(sum(1 for s in scores[j * n:(j + 1) * n] if s >= 1.0) for j in range(len(chunk)))
    return counts


def sampled_answers(model, tok, task, items: list[dict], *, n: int, max_new_tokens: int, temperature: float,
                    top_p: float, seed: int, batch_size: int = 256) -> tuple[list[list[float]], list[list[str]]]:
    """For each item, the scores and answers (`task.answer`) of ``n`` sampled completions, in sampling order
    (the same samples `sampled_pass_counts` draws with the same seed)."""
    scores: list[list[float]] = []
    answers: list[list[str]] = []
    for chunk, repeated, completions in _sampled_chunks(model, tok, task, items, n, max_new_tokens, temperature,
                                                        top_p, seed, batch_size):
        flat_scores = task.score_batch(repeated, completions)
        flat_answers = [task.answer(it, c) for it, c in zip(repeated, completions)]
        for j in range(len(chunk)):
            scores.append([float(s) for s in flat_scores[j * n:(j + 1) * n]])
            answers.append(flat_answers[j * n:(j + 1) * n])
    return scores, answers


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
