"""The policy's training forward: log-probs of completion tokens for whole sequences, differentiable.

`sequence_logprobs` is the training side of the numbers `onelayer.rollout.sample` reports, so the two agree
to float precision. For Llama-family models it runs `lean_sequence_logprobs`, straight from the model's
parameters with each prompt shared by G samples computed once; otherwise the model's own forward.
`sequence_block_input` gives the hidden states entering a block (frozen-prefix reuse).
"""

from __future__ import annotations

import contextlib

import torch

from onelayer.models import prefix
from onelayer.policy import fused_ops
from onelayer.policy.ops import _apply, _forward_kwargs, _mask_4d, position_ids
from onelayer.policy.support import lean_available


def lean_sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                           prompt_index: torch.Tensor | None = None, *, temperature: float = 1.0,
                           block_input: torch.Tensor | None = None, block_index: int | None = None,
                           ops=None) -> torch.Tensor:
    """`rollout.sequence_logprobs` for Llama-family models, differentiable, with each prompt computed once.

    Rows with the same `prompt_index` share their prompt (the G samples of one prompt): the prompt's
    positions go through the blocks once, and each row's completion attends to that shared prompt's keys
    and values (autograd sums the rows' gradients into it). A completion's last token predicts nothing
    here and no earlier position attends to it, so it does not go through the blocks. All tokens of both parts run through the
    linear and elementwise ops as one flat [tokens, H] matrix. With `block_input` the forward starts at
    block `block_index` on those hidden states (frozen-prefix reuse). The norms, q/k/v, attention and MLP
    element-wise parts run on `ops` (`policy.fused_ops`: torch ops or compiled kernels; None: `fused_ops.choose` decides).
    Returns FloatTensor[B, T].
    """
    inner = model.model
    cfg = model.config
    B, L = input_ids.shape
    P, T = prompt_len, L - prompt_len
    Tc = max(T - 1, 1)  # completion positions through the blocks: all but the last (which only predicts beyond)
    h = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or h
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
    device = input_ids.device

    # one representative row per distinct prompt; `inv` maps every row to it
    if prompt_index is None:
        prompt_index = torch.arange(B, device=device)
    _, inv = torch.unique(prompt_index, return_inverse=True)
    rep = torch.zeros(int(inv.max()) + 1, dtype=torch.long, device=device).scatter_(
        0, inv.flip(0), torch.arange(B - 1, -1, -1, device=device))
    if not torch.equal(input_ids[rep][inv, :P], input_ids[:, :P]):  # not actually shared: no sharing
        inv, rep = torch.arange(B, device=device), torch.arange(B, device=device)
    N = len(rep)
    pmask = attention_mask[rep, :P].bool()
    positions = position_ids(attention_mask)
    pos = torch.cat([positions[rep, :P].reshape(-1), positions[:, P:P + Tc].reshape(-1)])

    if block_input is None:
        start = 0
        x = inner.embed_tokens(torch.cat([input_ids[rep, :P].reshape(-1), input_ids[:, P:P + Tc].reshape(-1)]))
    else:
        start = block_index
        x = torch.cat([block_input[rep, :P].reshape(N * P, -1), block_input[:, P:P + Tc].reshape(B * Tc, -1)])
    if ops is None:
        ops = fused_ops.choose(model, lambda chosen: lean_sequence_logprobs(
            model, input_ids, attention_mask, prompt_len, prompt_index, temperature=temperature,
            block_input=block_input, block_index=block_index, ops=chosen), x, start)
    cos, sin = inner.rotary_emb(x[:1], pos[None])
    rotary = ops.rotary(cos[0], sin[0])  # [tokens, d] each

    layout = fused_ops.SharedPrompts(pmask.contiguous(), inv, Tc)
    n_p = N * P

    for block in inner.layers[start:]:
        attn = block.self_attn
        q, k, v = ops.qkv(ops.norm(x, block.input_layernorm), attn, rotary, h, kvh, d)  # [tokens, heads, d]
        a = ops.attention(q, k, v, layout)  # [tokens, h d]
        x = x + _apply(attn.o_proj, a)
        x = x + ops.mlp(ops.norm(x, block.post_attention_layernorm), block.mlp)

    # positions P-1 .. P+T-2 predict tokens P .. P+T-1: the prompt's last position, then completion 0..T-2
    last = torch.cat([x[:n_p].view(N, P, -1)[:, -1].index_select(0, inv)[:, None], x[n_p:].view(B, Tc, -1)[:, : T - 1]], 1)
    logits = _apply(model.lm_head, ops.norm(last, inner.norm)).float()
    if temperature != 1.0:
        logits = logits / temperature
    target = input_ids[:, P:]
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logp.masked_fill(attention_mask[:, P:] == 0, 0.0)


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

    For Llama-family models (``onelayer.policy``, unless ``lean=False``) the forward runs on the
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
