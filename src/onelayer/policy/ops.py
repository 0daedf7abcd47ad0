"""The lean forwards' building blocks: position and mask conventions, RMSNorm as HF computes it, and a
float32 CPU linear that runs on the kernel measured fastest for its shape (`onelayer.policy.kernels`).

Also the two conventions both the lean paths and the model's own forward follow: which cache and
logits-to-keep arguments a transformers model takes, and the 4-D attention mask it wants.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from onelayer.policy import kernels


def position_ids(mask2d: torch.Tensor) -> torch.Tensor:
    """Rotary positions of left-padded rows: 0 at each row's first real token (padding clamped to 0)."""
    return (mask2d.long().cumsum(-1) - 1).clamp(min=0)


def causal_allowed(mask2d: torch.Tensor, q_start: int = 0) -> torch.Tensor:
    """Bool [B, 1, L - q_start, L] of which keys each query from position `q_start` on may see: earlier or
    same positions that are not padding (`mask2d` [B, L]); a padding query sees itself, so no row is empty."""
    L = mask2d.shape[1]
    q = torch.arange(q_start, L, device=mask2d.device)[:, None]
    k = torch.arange(L, device=mask2d.device)[None, :]
    return ((k <= q) & mask2d.bool()[:, None, None, :]) | (k == q)


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _kernel(x: torch.Tensor, w: torch.Tensor, tokens: str = "m") -> str:
    """The kernel for this linear (`onelayer.policy.kernels`: measured per shape on this machine, for float32
    on CPU; "default" elsewhere). `tokens`: which dimension counts tokens."""
    if x.device.type != "cpu" or not x.dtype == torch.float32 == w.dtype:
        return "default"
    return kernels.choose(_rows(x), w.shape[1], w.shape[0], tokens)


class _ChosenLinear(torch.autograd.Function):
    """`F.linear` on a chosen kernel with its backward (dX = dY W, dW = dY^T X), each product on the kernel
    measured fastest for its own shape."""

    @staticmethod
    def forward(ctx, x, w, b, kernel):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return kernels.run(kernel, x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = w.t()
            kernel = _kernel(dy2, wt)
            dx = (dy2 @ w if kernel == "default" else kernels.run(kernel, dy2, wt)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dyt, xt = dy2.t(), x.reshape(-1, x.shape[-1]).t()
            dw = kernels.onednn_linear(dyt, xt, None) if _kernel(dyt, xt, "k") == "onednn" else dyt @ xt.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, on the kernel measured fastest on this machine for a float32 CPU shape
    (`onelayer.policy.kernels`). Same math; the summation order can differ between kernels, so they agree
    to float rounding (~1e-6 relative), not always bit for bit."""
    kernel = _kernel(x, w)
    if kernel == "default":
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _ChosenLinear.apply(x, w, b, kernel)
    return kernels.run(kernel, x, w, b)


def _apply(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def _norm(x: torch.Tensor, norm) -> torch.Tensor:
    """HF's RMSNorm: float32 statistics, weight applied in the input dtype."""
    return norm.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, _eps(norm)).to(x.dtype)


def _forward_kwargs(model) -> tuple[str, bool]:
    """Name of the cache argument (transformers 5 renamed past_key_values -> cache) and logits_to_keep support."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, ("logits_to_keep" in params)


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
