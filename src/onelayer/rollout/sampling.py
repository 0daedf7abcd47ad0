"""Batched sampling with a KV cache, and the log-probs the RL loss needs.

`sample` draws `num_generations` completions for each prompt with a Hugging Face causal LM, one token per
step for the whole batch, reusing the model's own forward and a transformers cache. `sequence_logprobs`
recomputes (differentiably) the log-probs of the completion tokens of whole sequences; it is the training
side of the same numbers, so `sample(...).logprobs` and `sequence_logprobs` agree to float precision.

Conventions (shared by both functions):

* Prompts are left-padded, completions right-padded after EOS; `position_ids = cumsum(mask) - 1`, so padding
  never shifts the positions of real tokens.
* Log-probs are of the *temperature-scaled* distribution, `log_softmax(logits / temperature)`, as TRL
  computes them, even when `top_p < 1` truncates the distribution actually sampled from. The truncated
  (renormalised) distribution is a sampling heuristic; the policy-gradient ratio compares the model's
  temperature-scaled policy before and after an update, and `sequence_logprobs` cannot know which tokens
  top-p had cut at sampling time. With `greedy=True` the log-probs are under temperature 1.

Why it is faster than `model.generate` for GRPO-shaped batches:

* each *distinct* prompt is prefilled once and its KV cache repeated for every row that has it: G times
  for a GRPO group, more where a batch repeats a prompt (prefill is most of the compute for short
  completions, and the turns of agent episodes repeat states);
* the 4-D attention mask is built once for the whole rollout and sliced each step, instead of being rebuilt
  by the model on every call, and keys/values go into a preallocated StaticCache (no per-step torch.cat);
* on CPU, one-token decode attention uses torch's math SDPA kernel, faster there than the fused one;
* no logits processors, stopping criteria or per-step bookkeeping beyond a few tensor ops;
* rows that have finished are dropped from the batch (and the cache) once enough of them have finished.
"""

from __future__ import annotations

import dataclasses

import torch

from onelayer.policy.support import lean_available
from onelayer.rollout.batch import RolloutBatch, left_pad
from onelayer.rollout.steppers import _decode_attention_kernel, _HFStepper, _LeanStepper

__all__ = ["RolloutBatch", "left_pad", "sample", "sample_texts", "stop_token_ids", "truncate_at_stops"]


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from logits[B, V]. Returns (tokens LongTensor[B], logprobs FloatTensor[B]).

    Log-probs are under log_softmax(logits / temperature) (temperature 1 when greedy), not the top-p
    renormalised distribution — see the module docstring."""
    logits = logits.float()
    if greedy:
        logp = torch.log_softmax(logits, -1)
        tok = logp.argmax(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, -1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(-1, descending=True)
        probs = sorted_logp.exp()
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already
        # does. The top token has zero mass before it, so it is always kept.
        probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_p, 0.0)
        tok = order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    else:
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@torch.inference_mode()
def _sample(model, prompts, G, max_new_tokens, temperature, top_p, greedy, eos_id, pad_id, generator,
            capture=None, block_path=None, lean=True, stop_ids=None):
    device = next(model.parameters()).device
    eos = -1 if eos_id is None else int(eos_id)
    stop_ids = None if stop_ids is None or not len(stop_ids) else stop_ids.to(device)
    can_stop = eos >= 0 or stop_ids is not None

    ids, pmask = left_pad(prompts, pad_id)
    ids, pmask = ids.to(device), pmask.to(device)
    N, P = ids.shape
    B, T = N * G, max_new_tokens
    # each distinct prompt is prefilled once: `first` holds one row per distinct prompt, `rows_of` maps every
    # batch row (prompt-major, G per prompt) to its prefilled row
    first, inverse = distinct_prompts(prompts)
    first = torch.as_tensor(first, device=device)
    rows_of = torch.as_tensor(inverse, device=device).repeat_interleave(G)
    stepper_cls = _LeanStepper if lean and lean_available(model) else _HFStepper
    stepper = stepper_cls(model, pmask, G, T, capture, block_path)
    try:
        # Prefill each distinct prompt once, then repeat its cache for each of its rows.
        logits = stepper.prefill(ids[first], pmask[first], first)
        if len(first) < B:
            stepper.expand(rows_of)
            logits = logits.index_select(0, rows_of)
        pos = pmask.sum(1, keepdim=True).repeat_interleave(G, 0)  # position of the first completion token

        tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((B, T), dtype=torch.float32, device=device)
        cmask = torch.zeros((B, T), dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # original row of each row still in the batch (and the cache)
        at = slice(None)  # `rows` as an index: a plain slice until rows are dropped
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        check_every = 1 if device.type == "cpu" else 4  # .item() is free on CPU, a sync on GPU
        steps = 0
        with _decode_attention_kernel(device):
            for t in range(T):
                tok, lp = _next_tokens(logits, temperature, top_p, greedy, generator)
                tok = tok.masked_fill(finished, pad_id)
                tokens[at, t] = tok
                logps[at, t] = lp.masked_fill(finished, 0.0)
                cmask[at, t] = ~finished
                finished = finished | (tok == eos)
                if stop_ids is not None:
                    finished = finished | torch.isin(tok, stop_ids)
                steps = t + 1
                if t == T - 1:
                    break
                if can_stop and (t + 1) % check_every == 0:
                    n_done = int(finished.sum())
                    if n_done == len(rows):
                        break
                    # Drop finished rows once they are a sizeable share of the batch: less attention and MLP work.
                    if n_done * 4 >= len(rows):
                        keep = (~finished).nonzero().squeeze(-1)
                        stepper.keep(keep)
                        rows, tok, finished, pos = rows[keep], tok[keep], finished[keep], pos[keep]
                        at = rows
                logits = stepper.decode(tok, pos + t, t, rows)
    finally:
        stepper.close()

    tokens, logps, cmask = tokens[:, :steps], logps[:, :steps], cmask[:, :steps]
    captured = None if stepper.captured is None else stepper.captured[:, : P + steps]
    return RolloutBatch.assemble(ids, pmask, tokens, cmask, logps, G, block_input=captured, block_index=capture)


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """The first index of each distinct prompt, in order of first appearance, and each prompt's position
    among them. Multi-turn episodes repeat states, so a turn's prompts often repeat (all G episodes of a
    seed start alike)."""
    seen: dict[tuple, int] = {}
    first: list[int] = []
    inverse = []
    for i, p in enumerate(prompts):
        if (u := seen.setdefault(tuple(p), len(seen))) == len(first):
            first.append(i)
        inverse.append(u)
    return first, inverse


def check_sampling_args(num_generations: int, max_new_tokens: int, temperature: float, top_p: float,
                        greedy: bool) -> None:
    """The argument checks every sampler (this one, the vLLM one) applies."""
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(
    model,
    prompts: list[list[int]],
    *,
    num_generations: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None = None,
    capture_block: int | None = None,
    block_path: str | None = None,
    lean: bool = True,
    stop_ids: torch.Tensor | None = None,
) -> RolloutBatch:
    """Sample `num_generations` completions for each prompt (token-id lists) with a KV cache.

    A row ends when it emits `eos_id` or any token of `stop_ids` (`stop_token_ids`: tokens whose text holds
    a stop string; that token is kept, like EOS), or after `max_new_tokens`; `eos_id=-1` (or None) and no
    `stop_ids` never stop early. Finished rows are padded with `pad_id` and masked. Sampling is temperature + nucleus (top-p);
    `greedy=True` takes the argmax and reports log-probs at temperature 1. Pass a seeded `generator` (on the
    model's device) for reproducible samples. The model runs in eval mode and its training flag is restored.

    `capture_block=l` also returns the hidden states entering decoder block l (`block_input`, for
    frozen-prefix reuse; `block_path` locates the blocks if discovery needs help). `lean=False` forces the
    model's own forward even where `onelayer.policy` supports the architecture.
    """
    check_sampling_args(num_generations, max_new_tokens, temperature, top_p, greedy)
    was_training = model.training
    model.eval()
    try:
        batch = _sample(
            model, prompts, num_generations, max_new_tokens, temperature, top_p, greedy, eos_id, pad_id, generator,
            capture_block, block_path, lean, stop_ids,
        )
    finally:
        model.train(was_training)
    # Tensors made under inference_mode cannot enter autograd (the training forward embeds input_ids):
    # hand back ordinary copies. They are small.
    return batch.map(torch.Tensor.clone)


_STOP_IDS: dict = {}


def stop_token_ids(tok, stop_strings) -> torch.Tensor | None:
    """Ids of every vocabulary token whose text contains one of `stop_strings` (cached per tokenizer), for
    `sample(stop_ids=...)`; None without stop strings."""
    stops = tuple(stop_strings or ())
    if not stops:
        return None
    key = (getattr(tok, "name_or_path", ""), len(tok), type(tok).__name__, stops)
    if key not in _STOP_IDS:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        _STOP_IDS[key] = torch.tensor([i for i, t in enumerate(texts) if any(s in t for s in stops)], dtype=torch.long)
    return _STOP_IDS[key]


def truncate_at_stops(tok, batch: RolloutBatch, stop_strings) -> RolloutBatch:
    """Mask every token after the one that completes the first stop string of a row's text.

    `sample` ends a row at a token that holds a stop string by itself; a stop string spread over several
    tokens is only visible in the decoded text, so those rows are cut here, and their behaviour log-probs
    then cover exactly the tokens kept."""
    stops = tuple(stop_strings or ())
    if not stops:
        return batch
    lengths = batch.completion_mask.sum(1).long().tolist()
    new = list(lengths)
    for r, (row, n) in enumerate(zip(batch.completion_ids.tolist(), lengths)):
        if n > 1 and any(s in tok.decode(row[: n - 1]) for s in stops):
            new[r] = next(k for k in range(1, n) if any(s in tok.decode(row[:k]) for s in stops))
    if new == lengths:
        return batch
    T = batch.completion_ids.shape[1]
    keep = (torch.arange(T, device=batch.completion_mask.device)[None]
            < torch.tensor(new, device=batch.completion_mask.device)[:, None])
    cmask = batch.completion_mask * keep
    P = batch.prompt_len
    attention = batch.attention_mask.clone()
    attention[:, P:] = attention[:, P:] * keep
    return dataclasses.replace(batch, completion_mask=cmask, logprobs=batch.logprobs * keep,
                               attention_mask=attention, completion_lengths=cmask.sum(1).long())


def sample_texts(model, tok, prompts: list[str], *, stop_strings=(), sample_fn=None, **kwargs):
    """Encode text prompts, sample (`sample_fn`, default `sample`) with the tokenizer's EOS and pad ids and
    the stop strings, cut rows at their stop string, and decode. Returns (RolloutBatch, completion texts).
    Texts keep the stop string; the task's scorer cuts it (`onelayer.tasks.prompts`)."""
    stop_ids = stop_token_ids(tok, stop_strings)
    extra = {} if stop_ids is None else {"stop_ids": stop_ids}
    batch = (sample_fn or sample)(model, encode_prompts(tok, prompts), eos_id=tok.eos_token_id,
                                  pad_id=tok.pad_token_id, **extra, **kwargs)
    batch = truncate_at_stops(tok, batch, stop_strings)
    return batch, decode_completions(tok, batch.completion_ids, batch.completion_mask)


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
