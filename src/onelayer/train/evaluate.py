"""Greedy evaluation of a policy on a task's held-out items, returning per-item scores."""

from __future__ import annotations

import torch

from onelayer.rollout import sample


def encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    return [tok(p, add_special_tokens=False).input_ids for p in prompts]


def decode_completions(tok, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """Completion texts up to (not including) EOS."""
    lengths = completion_mask.sum(dim=1).long().tolist()
    texts = []
    for row, n in zip(completion_ids.tolist(), lengths):
        ids = row[:n]
        if ids and ids[-1] == tok.eos_token_id:
            ids = ids[:-1]
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts


@torch.no_grad()
def greedy_scores(model, tok, task, items: list[dict], *, max_new_tokens: int, batch_size: int = 256) -> list[float]:
    """Score greedy completions of `items`; one float in [0, 1] per item, in order."""
    scores: list[float] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        batch = sample(
            model, encode_prompts(tok, [it["prompt"] for it in chunk]), num_generations=1,
            max_new_tokens=max_new_tokens, greedy=True, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        )
        completions = decode_completions(tok, batch.completion_ids, batch.completion_mask)
        scores.extend(float(s) for s in task.score_batch(chunk, completions))
    return scores
