"""The training forward's element-wise work as compiled kernels (`fused_train.cpp`), used where it measures faster.

`lean_sequence_logprobs` runs each block as norm, q/k/v, attention, output projection, norm, MLP. On a CPU
a small model spends much of its forward and backward in the element-wise parts: the RMSNorms, Qwen3's
per-head q/k norm, rotary and SiLU·up, each several torch ops and passes over memory, each with its own
backward ops. `CompiledOps` runs each of them as one pass forward and one backward, and the q/k/v and the
gate/up projections each as one matmul over the concatenated weights. `TorchOps` is the same math in
torch ops, and what runs where the compiled module is not built or not used.

`choose` decides once per model shape and first block, on the first call's own inputs: it runs both,
checks the compiled ops against the torch ones (log-probs to `TOL`; when that call needs gradients, every
trainable tensor's gradient to `GRAD_TOL`, relative to its largest value) and times both (best of 3). The
compiled ops serve when they agree and are faster by `MARGIN`. One decision serves every later call of that
shape, with or without gradients and whatever its number of tokens: the KL reference's log-probs and the
policy's must come from the same ops, or their float differences (~1e-6) give the KL term a gradient of
noise that AdamW, which normalises every gradient, turns into full-size steps. The timing is
kept with the matmul choices (`kernels.store`), so later processes on the machine reuse it and stay
reproducible. ``ONELAYER_FUSED_TRAIN=off`` turns them off, ``on`` skips the timing (still checked).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch
import torch.nn.functional as F

from onelayer.policy import fused, kernels
from onelayer.policy.ops import _apply, _eps, _norm, causal_allowed, linear

ENV = "ONELAYER_FUSED_TRAIN"
MARGIN = 0.05
TOL, GRAD_TOL = 1e-5, 1e-4
_LOG = logging.getLogger("onelayer.fused")
_DECIDED: dict[str, dict] = {}  # per key: {"choice": "torch" | "compiled", "torch", "compiled" (s), "reason"}
_EMPTY = torch.empty(0)


def mode() -> str:
    value = os.environ.get(ENV, "auto").lower()
    return value if value in ("auto", "on", "off") else "auto"


def _module():
    return fused.extension()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        y, rstd = _module().rms_fwd(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dx, dw = _module().rms_bwd(dy, x, w, rstd, ctx.needs_input_grad[1])
        return dx, dw if ctx.needs_input_grad[1] else None, None


class _QKV(torch.autograd.Function):
    """q, k, v [tokens, heads, d] from one [tokens, (h + 2 kvh) d] projection: q and k RMS-normed per head
    (weights wq, wk; empty: no norm) and rotated (cos, sin [tokens, d]), v as it is."""

    @staticmethod
    def forward(ctx, qkv, wq, wk, cos, sin, eps, h, kvh, d):
        q, k, v, rstd = _module().qkv_fwd(qkv, wq, wk, cos, sin, eps, h, kvh, d)
        ctx.save_for_backward(qkv, wq, wk, cos, sin, rstd)
        ctx.dims = (h, kvh, d)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, wq, wk, cos, sin, rstd = ctx.saved_tensors
        h, kvh, d = ctx.dims

        def grad(g, heads):
            return g if g is not None else qkv.new_zeros(qkv.shape[0], heads, d)

        dqkv, dwq, dwk = _module().qkv_bwd(grad(dq, h), grad(dk, kvh), grad(dv, kvh), qkv, wq, wk, cos, sin, rstd, h, kvh, d)
        norm = wq.numel() > 0
        return (dqkv, dwq if norm and ctx.needs_input_grad[1] else None, dwk if norm and ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of one [tokens, 2I] projection (gate | up)."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return _module().swiglu_fwd(gu)

    @staticmethod
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        return _module().swiglu_bwd(dy, gu)


class _Attention(torch.autograd.Function):
    """Attention of every token of a lean training forward (`SharedPrompts`) from q [tokens, h, d], k and v
    [tokens, kvh, d]; returns [tokens, h d]."""

    @staticmethod
    def forward(ctx, q, k, v, pmask, inv, Tc, scale):
        out, lse = _module().attn_fwd(q, k, v, pmask, inv, Tc, scale)
        ctx.save_for_backward(q, k, v, out, lse, pmask, inv)
        ctx.args = (Tc, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, pmask, inv = ctx.saved_tensors
        dq, dk, dv = _module().attn_bwd(dout, q, k, v, out, lse, pmask, inv, *ctx.args)
        return dq, dk, dv, None, None, None, None


@dataclasses.dataclass
class SharedPrompts:
    """Where each token of a lean training forward sits: N distinct prompts of P tokens (`pmask` [N, P], False
    at left padding) come first, then B rows of `Tc` completion tokens, row b sharing prompt `inv[b]`. A prompt
    token attends within its prompt (causally, not to padding); a completion token to its prompt and to its
    own row's earlier completion tokens."""

    pmask: torch.Tensor
    inv: torch.Tensor
    Tc: int

    @functools.cached_property
    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt queries' [N, 1, P, P] and the completion queries' [B, 1, Tc, P + Tc] bool masks."""
        B, P, Tc = len(self.inv), self.pmask.shape[1], self.Tc
        ar_t = torch.arange(Tc, device=self.inv.device)
        comp = torch.cat([self.pmask[self.inv][:, None, None, :].expand(B, 1, Tc, P),
                          (ar_t[None, :] <= ar_t[:, None]).expand(B, 1, Tc, Tc)], -1)
        return causal_allowed(self.pmask), comp


def _concat(*linears):
    """One weight (and bias) for several linears that read the same input."""
    b = None
    if any(m.bias is not None for m in linears):
        b = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears])
    return torch.cat([m.weight for m in linears]), b


class TorchOps:
    """The block's element-wise parts in torch ops."""

    name = "torch"

    @staticmethod
    def rotary(cos, sin):
        """The factors `qkv` takes, from the model's rotary table at each token ([tokens, d] each).
        rotate_half(x) * sin == roll(x, d/2) * sin with the first half's sign flipped: a roll has a cheap
        backward, where slicing + cat allocate and copy full-size gradients."""
        half = cos.shape[-1] // 2
        return cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]

    @staticmethod
    def norm(x, norm):
        return _norm(x, norm)

    @staticmethod
    def qkv(y, attn, rotary, h, kvh, d):
        # separate projections: slicing one fused output would cost a full-size gradient copy per slice
        q, k, v = (_apply(attn.q_proj, y).view(-1, h, d), _apply(attn.k_proj, y).view(-1, kvh, d),
                   _apply(attn.v_proj, y).view(-1, kvh, d))
        if getattr(attn, "q_norm", None) is not None:
            q, k = _norm(q, attn.q_norm), _norm(k, attn.k_norm)
        cos, sin = rotary
        half = d // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, v

    @staticmethod
    def attention(q, k, v, layout: SharedPrompts):
        N, P = layout.pmask.shape
        B, Tc, n_p, inv = len(layout.inv), layout.Tc, N * P, layout.inv
        h, kvh, d = q.shape[1], k.shape[1], q.shape[2]
        prompt_mask, comp_mask = layout.masks
        kp, vp = k[:n_p].view(N, P, kvh, d).transpose(1, 2), v[:n_p].view(N, P, kvh, d).transpose(1, 2)
        kc, vc = k[n_p:].view(B, Tc, kvh, d).transpose(1, 2), v[n_p:].view(B, Tc, kvh, d).transpose(1, 2)
        ap = F.scaled_dot_product_attention(q[:n_p].view(N, P, h, d).transpose(1, 2), kp, vp, attn_mask=prompt_mask,
                                            enable_gqa=kvh != h)
        # index_select, not kp[inv]: its backward (index_add) sums the rows' gradients into their shared prompt
        # in a fixed order; advanced indexing's accumulating backward did not on 2+ threads (runs drifted)
        ac = F.scaled_dot_product_attention(q[n_p:].view(B, Tc, h, d).transpose(1, 2),
                                            torch.cat([kp.index_select(0, inv), kc], 2),
                                            torch.cat([vp.index_select(0, inv), vc], 2), attn_mask=comp_mask,
                                            enable_gqa=kvh != h)
        return torch.cat([ap.transpose(1, 2).reshape(n_p, h * d), ac.transpose(1, 2).reshape(B * Tc, h * d)])

    @staticmethod
    def mlp(y, mlp):
        """down(silu(gate(y)) * up(y))."""
        return _apply(mlp.down_proj, F.silu(_apply(mlp.gate_proj, y)) * _apply(mlp.up_proj, y))


class CompiledOps:
    """The same math as `TorchOps` in the compiled kernels (`fused_train.cpp`)."""

    name = "compiled"

    @staticmethod
    def rotary(cos, sin):
        return cos.contiguous(), sin.contiguous()

    @staticmethod
    def norm(x, norm):
        return _RMSNorm.apply(x, norm.weight, _eps(norm))

    @staticmethod
    def qkv(y, attn, rotary, h, kvh, d):
        w, b = _concat(attn.q_proj, attn.k_proj, attn.v_proj)
        qn = getattr(attn, "q_norm", None)
        wq, wk = (qn.weight, attn.k_norm.weight) if qn is not None else (_EMPTY, _EMPTY)
        return _QKV.apply(linear(y, w, b), wq, wk, *rotary, _eps(qn) if qn is not None else 1e-6, h, kvh, d)

    @staticmethod
    def attention(q, k, v, layout: SharedPrompts):
        return _Attention.apply(q, k, v, layout.pmask, layout.inv, layout.Tc, q.shape[-1] ** -0.5)

    @staticmethod
    def mlp(y, mlp):
        return _apply(mlp.down_proj, _SwiGLU.apply(linear(y, *_concat(mlp.gate_proj, mlp.up_proj))))


def _why_not(model, x: torch.Tensor) -> str | None:
    """None when the compiled ops can run this forward, else why not."""
    if mode() == "off":
        return f"{ENV}=off"
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return "not a float32 CPU forward"
    if any(p.dtype != torch.float32 for p in model.model.layers.parameters()):
        return "blocks not all float32"
    d = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    if d % 2 or d > 1024:
        return f"head_dim {d}"
    if _module() is None:
        return f"compiled module {fused.build_note()}"
    return None


def _shape(model, start: int) -> str:
    cfg = model.config
    return (f"train:{cfg.model_type}-H{cfg.hidden_size}-I{cfg.intermediate_size}-h{cfg.num_attention_heads}"
            f"-kv{getattr(cfg, 'num_key_value_heads', None) or cfg.num_attention_heads}-L{cfg.num_hidden_layers}"
            f"-from{start}-{fused.build_id()}")


def choose(model, run, x: torch.Tensor, start: int):
    """The ops for one lean training forward of `model` from block `start` on the flat hidden states `x`
    [tokens, H]; `run(ops)` is that forward (it returns the log-probs). Decided on the first call per shape."""
    if _why_not(model, x) is not None:
        return TorchOps
    key = _shape(model, start)
    if key not in _DECIDED:
        params = [p for p in model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        _DECIDED[key] = {**_decide(key, run, params), "tokens": x.shape[0],
                         "timed": "forward and backward" if params else "forward"}
    return CompiledOps if _DECIDED[key]["choice"] == "compiled" else TorchOps


def _decide(key: str, run, params: list) -> dict:
    weights: dict[str, torch.Tensor] = {}

    def once(ops):  # the forward, and (when training) the gradient of a fixed weighting of its log-probs
        out = run(ops)
        if not params or not out.requires_grad:
            return [out.detach()]
        if "w" not in weights:
            weights["w"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad((out * weights["w"]).sum(), params, allow_unused=True)
        return [out.detach(), *grads]

    want = once(TorchOps)
    try:
        got = once(CompiledOps)
    except RuntimeError as exc:  # a shape or layout the kernels refuse: the torch ops serve
        return {"choice": "torch", "reason": f"the compiled ops raised {str(exc).splitlines()[0][:200]}"}
    err = fused._close(got[0], want[0])
    grad_err = max([fused._close(a, b) for a, b in zip(got[1:], want[1:]) if a is not None and b is not None], default=0.0)
    if err > TOL or grad_err > GRAD_TOL:
        return {"choice": "torch", "reason": f"the compiled ops differed by {err:.1e} (log-probs), {grad_err:.1e} (gradients)"}
    if mode() == "on":
        return {"choice": "compiled", "reason": f"{ENV}=on"}
    saved = kernels.stored(key)
    if saved is not None and saved.get("choice") in ("torch", "compiled"):
        return {**saved, "reason": "measured earlier on this machine"}
    times = kernels.time_each({"torch": lambda: once(TorchOps), "compiled": lambda: once(CompiledOps)}, 3)
    choice = "compiled" if times["compiled"] < times["torch"] * (1 - MARGIN) else "torch"
    kernels.store(key, choice, times)
    _LOG.info("training forward %s: torch %.3g ms, compiled %.3g ms -> %s", key, times["torch"] * 1e3,
              times["compiled"] * 1e3, choice)
    return {"choice": choice, **times, "reason": "measured"}


def choices() -> dict:
    """What this process decided per key, and how the compiled module was built (for run records)."""
    return {"build": fused.build_note(), "mode": mode(), **{k: dict(v) for k, v in sorted(_DECIDED.items())}}
