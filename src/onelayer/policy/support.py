"""Which models the lean paths reproduce, and the check that they do.

`lean_support` accepts the module layout of the HF Llama family (Qwen3, Qwen2, Llama, Mistral): plain
`nn.Linear` projections, no hooks, SiLU MLP, full attention everywhere. Once per model object, and only
after the decoder and the training forward both matched the model's own forward on a probe batch
(`_verified`), `lean_available` says yes; anything else takes the model's own forward, and
`forward_path` names which one runs and why.
"""

from __future__ import annotations

import weakref

import torch

from onelayer.policy.decoder import LeanDecoder
from onelayer.policy.ops import causal_allowed, position_ids

SUPPORTED_TYPES = ("qwen3", "qwen2", "llama", "mistral")
# per model object: None when the lean paths matched its forward on the probe, else why they did not
_VERIFIED: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


def lean_support(model) -> str | None:
    """None if the lean path reproduces `model`, else the reason it does not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    outer = (model, inner, inner.embed_tokens, inner.norm, model.lm_head)
    if type(model.lm_head) is not torch.nn.Linear or any(m._forward_hooks or m._forward_pre_hooks for m in outer):
        return "a modified LM head or forward hooks on the model"
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return "sliding-window layers"
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    for block in inner.layers:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "unexpected block layout"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
        # adapters (LoRA), quantised linears or hooks change what a module computes from its weight
        linears = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections that are not plain nn.Linear (adapters or quantised layers)"
        if any(m._forward_hooks or m._forward_pre_hooks for m in (block, attn, mlp, *linears)):
            return "forward hooks on a block"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    return None


def _verified(model, tol: float) -> str | None:
    """None when the lean paths (sampling: prefill and one decode step; training) give the model's own
    numbers on a small probe (left padding, shared prompts), else why not. Checked once per model object."""
    if model in _VERIFIED:
        return _VERIFIED[model]
    from onelayer.policy.forward import lean_sequence_logprobs  # the forward dispatches on this module
    from onelayer.policy.fused_ops import TorchOps

    ok = False
    try:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        V = model.config.vocab_size
        ids = torch.randint(0, V, (2, 6), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        pos = position_ids(mask)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
            dec = LeanDecoder(model, 2, 6)
            allowed = causal_allowed(mask)
            scale = max(1.0, float(ref.abs().max()))
            # sampling path: prefill five tokens, then decode the sixth against the cache
            prefill = dec.forward(ids[:, :5], pos[:, :5], 0, allowed[:, :, :5, :5])
            decode = dec.forward(ids[:, 5:], pos[:, 5:], 5, allowed[:, :, 5:, :])
            ok = bool(max((prefill - ref[:, 4]).abs().max(), (decode - ref[:, 5]).abs().max()) <= tol * scale)
            # training path: prompt = first 3 tokens, shared by both rows of each prompt
            rows, rmask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
            # the torch ops: the compiled ones are checked against those where they are first used (`fused_ops`)
            got = lean_sequence_logprobs(model, rows, rmask, 3, torch.tensor([0, 0, 1, 1], device=device), ops=TorchOps)
            want = torch.log_softmax(ref[:, 2:5], -1).gather(-1, ids[:, 3:, None]).squeeze(-1).repeat_interleave(2, 0)
            ok = ok and bool((got - want).abs().max() <= tol * scale)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the model's own forward, saying why
        _VERIFIED[model] = f"the probe batch raised {type(exc).__name__}: {str(exc)[:200]}"
        return _VERIFIED[model]
    _VERIFIED[model] = None if ok else "its logits did not match the model's own forward on the probe batch"
    return _VERIFIED[model]


def lean_available(model) -> bool:
    """Can the lean paths stand in for `model`'s forward (supported layout, one parameter dtype, no autocast,
    verified on a probe)?"""
    return _runtime_reason(model) is None


def _runtime_reason(model) -> str | None:
    reason = lean_support(model)
    if reason is not None:
        return reason
    p = next(model.parameters())
    if torch.is_autocast_enabled(p.device.type):
        return "autocast (mixed precision) is on: the model's own forward follows its casting rules"
    if any(q.dtype != p.dtype for q in model.parameters()):
        return "parameters of several dtypes (mixed precision)"
    return _verified(model, 1e-4 if p.dtype == torch.float32 else 3e-2)


def forward_path(model) -> str:
    """Which forward the rollout and training use for `model`: 'lean', or 'hf (reason)'."""
    reason = _runtime_reason(model)
    return "lean" if reason is None else f"hf ({reason})"
