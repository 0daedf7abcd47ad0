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

* the prompt is prefilled once per *distinct* prompt and its KV cache is repeated G times (prefill is most
  of the compute for short completions);
* the 4-D attention mask is built once for the whole rollout and sliced each step, instead of being rebuilt
  by the model on every call, and keys/values go into a preallocated StaticCache (no per-step torch.cat);
* on CPU, one-token decode attention uses torch's math SDPA kernel, about twice as fast there as the fused one;
* no logits processors, stopping criteria or per-step bookkeeping beyond a few tensor ops;
* rows that have finished are dropped from the batch (and the cache) once enough of them have finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, fields

import torch

from onelayer.models import prefix
from onelayer.rollout.lean import LeanDecoder, causal_allowed, lean_available, lean_sequence_logprobs, position_ids

__all__ = ["RolloutBatch", "left_pad", "sample", "sequence_block_input", "sequence_logprobs", "stop_token_ids",
           "truncate_at_stops"]


@dataclass
class RolloutBatch:
    """Sampled completions, laid out for the RL loss.

    Rows of one prompt are contiguous: prompt ``i``'s G samples are rows ``i*G .. i*G+G-1``.
    ``T`` is the number of decode steps actually run: ``max_new_tokens``, or fewer if every row emitted EOS.
    """

    input_ids: torch.Tensor  # LongTensor[B, P+T]: left-padded prompt, completion, pad after EOS
    attention_mask: torch.Tensor  # LongTensor[B, P+T]: 1 on real prompt tokens and completion tokens up to EOS
    prompt_len: int  # P, the padded prompt width
    completion_ids: torch.Tensor  # LongTensor[B, T]
    completion_mask: torch.Tensor  # FloatTensor[B, T]: 1 up to and including EOS, 0 after
    logprobs: torch.Tensor  # FloatTensor[B, T]: log_softmax(logits / temperature) of sampled tokens; 0 off-mask
    completion_lengths: torch.Tensor  # LongTensor[B]
    prompt_index: torch.Tensor  # LongTensor[B]: which input prompt each row came from
    # hidden states entering block `block_index` at every position (frozen-prefix reuse); zeros at positions
    # never fed to the model (the last sampled token, a dropped row's padding). None unless asked for.
    block_input: torch.Tensor | None = None  # FloatTensor[B, P+T, H]
    block_index: int | None = None

    @classmethod
    def assemble(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                 completion_mask: torch.Tensor, logprobs: torch.Tensor, num_generations: int,
                 block_input: torch.Tensor | None = None, block_index: int | None = None) -> "RolloutBatch":
        """The batch of N left-padded prompts (`prompt_ids`, `prompt_mask` [N, P]) and their G completions each,
        prompt-major: `tokens` [N*G, T] (padded after EOS), bool `completion_mask` and `logprobs` [N*G, T]."""
        N, P = prompt_ids.shape
        G = num_generations
        return cls(
            input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), tokens], 1),
            attention_mask=torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask.long()], 1),
            prompt_len=P,
            completion_ids=tokens,
            completion_mask=completion_mask.float(),
            logprobs=logprobs,
            completion_lengths=completion_mask.sum(1),
            prompt_index=torch.arange(N, device=prompt_ids.device).repeat_interleave(G),
            block_input=block_input,
            block_index=block_index,
        )

    def map(self, fn) -> "RolloutBatch":
        """The batch with `fn` applied to every tensor field (e.g. ``lambda t: t.to(device)``)."""
        return RolloutBatch(**{f.name: (fn(v) if torch.is_tensor(v := getattr(self, f.name)) else v)
                               for f in fields(self)})

    @property
    def num_generations(self) -> int:
        n_prompts = int(self.prompt_index[-1]) + 1 if len(self.prompt_index) else 1
        return len(self.prompt_index) // n_prompts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to one width. Returns (ids LongTensor[N, P], attention_mask LongTensor[N, P])."""
    if not prompts:
        raise ValueError("no prompts given")
    width = max(len(p) for p in prompts)
    if width == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask




def _forward_kwargs(model) -> tuple[str, bool]:
    """Name of the cache argument (transformers 5 renamed past_key_values -> cache) and logits_to_keep support."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, ("logits_to_keep" in params)


def _static_cache(model, max_len: int):
    """A StaticCache with `max_len` slots: keys/values are written in place, where a DynamicCache would
    torch.cat the whole cache every step. None if the model's config does not support one."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:  # noqa: BLE001 - any config StaticCache cannot handle falls back to a DynamicCache
        return None


def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep/repeat batch rows of every cache layer (`index` into the batch dimension). StaticCache layers
    have no batch_select_indices, so their key/value tensors are indexed directly."""
    for layer in cache.layers:
        if hasattr(layer, "batch_select_indices"):
            layer.batch_select_indices(index)
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


def _mask_4d(mask2d: torch.Tensor, q_start: int, model) -> torch.Tensor | None:
    """Causal+padding mask for query positions q_start.. against all keys, in the layout the model's attention
    wants: bool (True = attend) for sdpa, additive float for eager. None when the model needs its own mask
    builder (flash/flex attention, sliding-window layers) — the caller then passes the 2-D mask.

    A query at a padding position attends to itself, so no softmax row is empty (an all-masked row gives
    NaN in some kernels, and NaN keys/values would leak into real rows through 0 * NaN)."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    if impl not in ("sdpa", "eager") or any(t != "full_attention" for t in layer_types):
        return None
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return None
    allowed = causal_allowed(mask2d, q_start)
    if impl == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


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
    logp = torch.log_softmax(logits / temperature, -1)
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


def _decode_attention_kernel(device: torch.device):
    """On CPU, torch's fused (flash) SDPA kernel is about 2x slower than the plain math kernel for one query
    token against a short cache; elsewhere keep torch's choice."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class _HFStepper:
    """Prefill and decode steps through the model's own forward with a transformers cache (any causal LM).

    With `capture` (a block index), a forward pre-hook on that block records the hidden states entering it."""

    def __init__(self, model, pmask: torch.Tensor, G: int, T: int, capture: int | None, block_path: str | None):
        self.model = model
        self.cache_kw, has_ltk = _forward_kwargs(model)
        self.ltk = {"logits_to_keep": 1} if has_ltk else {}
        N, P = pmask.shape
        self.P = P
        # While decoding every completion slot counts as visible: a finished row's later tokens only feed
        # that row's own (discarded) outputs.
        full_mask = torch.cat([pmask, pmask.new_ones(N, T)], 1)
        mask4d = _mask_4d(full_mask, 0, model)  # [N, 1, L, L], built once and sliced per step
        self.cache = _static_cache(model, P + T) if mask4d is not None else None
        if self.cache is not None:  # queries attend over all L slots; the mask hides the ones not written yet
            self.prefill_mask, self.step_masks = mask4d[:, :, :P], mask4d[:, :, P:].repeat_interleave(G, 0)
        else:  # the model builds its own mask from the 2-D one each step
            self.cache = _dynamic_cache(model)
            self.prefill_mask, self.step_masks = pmask, full_mask.repeat_interleave(G, 0)
        self.static = self.prefill_mask.dim() == 4
        self.captured, self._hook, self._last = None, None, None
        if capture is not None:
            from onelayer.models.layers import find_blocks

            block = find_blocks(model, block_path)[1][capture]
            self._hook = block.register_forward_pre_hook(self._record, with_kwargs=True)
            dtype = next(model.parameters()).dtype
            self.captured = torch.zeros(N * G, P + T, model.config.hidden_size, dtype=dtype, device=pmask.device)

    def _record(self, module, args, kwargs):
        self._last = args[0] if args else kwargs["hidden_states"]

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _forward(self, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: self.cache}, **self.ltk)
        return out.logits[:, -1]

    def prefill(self, ids, pmask):
        logits = self._forward(ids, self.prefill_mask, position_ids(pmask))
        if self.captured is not None:
            self.captured[: ids.shape[0], : self.P] = self._last
        return logits

    def expand(self, G: int, N: int) -> None:
        index = torch.arange(N, device=self.step_masks.device).repeat_interleave(G)
        _select_cache_rows(self.cache, index)
        if self.captured is not None:
            self.captured[:, : self.P] = self.captured[:N, : self.P].index_select(0, index)

    def keep(self, index: torch.Tensor) -> None:
        _select_cache_rows(self.cache, index)
        self.step_masks = self.step_masks[index]

    def decode(self, tok, positions, t: int, rows):
        step_mask = self.step_masks[:, :, t : t + 1] if self.static else self.step_masks[:, : self.P + t + 1]
        logits = self._forward(tok[:, None], step_mask, positions)
        if self.captured is not None:
            self.captured[rows, self.P + t] = self._last[:, 0]
        return logits


class _LeanStepper:
    """The same steps through `onelayer.rollout.lean.LeanDecoder` (Llama-family models, verified)."""

    def __init__(self, model, pmask: torch.Tensor, G: int, T: int, capture: int | None, block_path: str | None):
        N, P = pmask.shape
        self.P = P
        self.dec = LeanDecoder(model, N * G, P + T, capture)
        self.captured = self.dec.captured
        self.prefill_mask = causal_allowed(pmask)  # [N, 1, P, P]
        # decode: a query sees every written slot except left padding; no padding, no mask needed
        self.step_mask = None if bool(pmask.all()) else torch.cat(
            [pmask.bool(), pmask.new_ones(N, T, dtype=torch.bool)], 1).repeat_interleave(G, 0)[:, None, None, :]

    def close(self) -> None:
        pass

    def prefill(self, ids, pmask):
        return self.dec.forward(ids, position_ids(pmask), 0, self.prefill_mask)

    def expand(self, G: int, N: int) -> None:
        index = torch.arange(N, device=self.prefill_mask.device).repeat_interleave(G)
        self.dec.repeat_rows(index)
        if self.captured is not None:
            self.captured[:, : self.P] = self.captured[:N, : self.P].index_select(0, index)

    def keep(self, index: torch.Tensor) -> None:
        self.dec.repeat_rows(index)
        if self.step_mask is not None:
            self.step_mask = self.step_mask[index]

    def decode(self, tok, positions, t: int, rows):
        end = self.P + t + 1
        mask = None if self.step_mask is None else self.step_mask[..., :end]
        return self.dec.forward(tok[:, None], positions, self.P + t, mask, rows=rows)


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
    stepper_cls = _LeanStepper if lean and lean_available(model) else _HFStepper
    stepper = stepper_cls(model, pmask, G, T, capture, block_path)
    try:
        # Prefill each distinct prompt once, then repeat its cache G times.
        logits = stepper.prefill(ids, pmask)
        if G > 1:
            stepper.expand(G, N)
            logits = logits.repeat_interleave(G, 0)
        pos = pmask.sum(1, keepdim=True).repeat_interleave(G, 0)  # position of the first completion token

        tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((B, T), dtype=torch.float32, device=device)
        cmask = torch.zeros((B, T), dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)  # original row of each row still in the batch (and the cache)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        check_every = 1 if device.type == "cpu" else 4  # .item() is free on CPU, a sync on GPU
        steps = 0
        with _decode_attention_kernel(device):
            for t in range(T):
                tok, lp = _next_tokens(logits, temperature, top_p, greedy, generator)
                tok = tok.masked_fill(finished, pad_id)
                tokens[rows, t] = tok
                logps[rows, t] = lp.masked_fill(finished, 0.0)
                cmask[rows, t] = ~finished
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
                logits = stepper.decode(tok, pos + t, t, rows)
    finally:
        stepper.close()

    tokens, logps, cmask = tokens[:, :steps], logps[:, :steps], cmask[:, :steps]
    captured = None if stepper.captured is None else stepper.captured[:, : P + steps]
    return RolloutBatch.assemble(ids, pmask, tokens, cmask, logps, G, block_input=captured, block_index=capture)


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
    model's own forward even where `onelayer.rollout.lean` supports the architecture.
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


def _sequence_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Model inputs for whole sequences, with the rollout's mask and position conventions."""
    mask4d = _mask_4d(attention_mask, 0, model)
    return {"input_ids": input_ids, "attention_mask": attention_mask if mask4d is None else mask4d,
            "position_ids": position_ids(attention_mask)}


def sequence_block_input(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, block_index: int,
                         block_path: str | None = None) -> torch.Tensor:
    """The hidden states entering block `block_index` for whole sequences, as `sequence_logprobs` computes
    them (no grad): for frozen-prefix reuse when the rollout did not capture them (e.g. multi-turn episodes)."""
    return prefix.block_input(model, block_index, block_path=block_path, **_sequence_inputs(model, input_ids, attention_mask))


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    *,
    temperature: float = 1.0,
    block_input: torch.Tensor | None = None,
    block_index: int | None = None,
    block_path: str | None = None,
    prompt_index: torch.Tensor | None = None,
    lean: bool = True,
) -> torch.Tensor:
    """Log-probs of tokens ``input_ids[:, prompt_len:]`` under ``log_softmax(logits / temperature)``.

    One full forward (differentiable; gradients flow to whatever parameters require them). Only the logits
    that predict completion tokens are computed, and each log-prob is taken as gathered logit − logsumexp,
    without materialising a [B, T, V] log-softmax. Returns FloatTensor[B, T], 0 where attention_mask is 0.

    With ``block_input`` (the hidden states entering block ``block_index``, e.g. captured by ``sample``),
    the forward starts at that block (frozen-prefix reuse, ``onelayer.models.prefix``).

    For Llama-family models (``onelayer.rollout.lean``, unless ``lean=False``) the forward runs on the
    model's parameters directly and rows with the same ``prompt_index`` compute their shared prompt once.
    """
    T = input_ids.shape[1] - prompt_len
    if T <= 0:
        return input_ids.new_zeros((input_ids.shape[0], 0), dtype=torch.float32)
    if lean and (block_path is None or block_input is None) and lean_available(model):
        return lean_sequence_logprobs(model, input_ids, attention_mask, prompt_len, prompt_index,
                                      temperature=temperature, block_input=block_input, block_index=block_index)
    _, has_ltk = _forward_kwargs(model)
    start = contextlib.nullcontext() if block_input is None else prefix.start_at_block(
        model, block_index, block_input, block_path)
    with start:
        out = model(**_sequence_inputs(model, input_ids, attention_mask), use_cache=False,
                    **({"logits_to_keep": T + 1} if has_ltk else {}))
    # Logits at positions P-1 .. P+T-2 predict tokens P .. P+T-1.
    logits = out.logits[:, -(T + 1) : -1].float()
    if temperature != 1.0:
        logits = logits / temperature
    target = input_ids[:, prompt_len:]
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logp.masked_fill(attention_mask[:, prompt_len:] == 0, 0.0)


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
    keep = (torch.arange(T, device=batch.completion_mask.device)[None] < torch.tensor(new, device=batch.completion_mask.device)[:, None])
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
