"""Lean paths for Llama-family decoders (Qwen3, Qwen2, Llama, Mistral): rollout decoding and the training forward.

On a CPU the tiny models spend most of a decode step in per-op and per-module overhead, not in
arithmetic: one HF forward of a 64-row decode step runs ~40 modules and ~400 tensor ops. These paths
run the same math straight from the model's own parameters:

    x = embed(ids); per block: h = rms_norm(x); q, k, v = h Wq, h Wk, h Wv (+ biases); [Qwen3: per-head
    rms_norm of q and k]; rotary(q, k) with the model's own rotary table; a = sdpa(q, K, V, mask);
    x += a Wo; x += down(silu(h' Wg) * h' Wu); logits = rms_norm(x) W_head

`LeanDecoder` (used by `rollout.sample`) decodes into a preallocated KV cache; `lean_sequence_logprobs`
(used by `rollout.sequence_logprobs`) is the differentiable forward of whole sequences, computing each
prompt shared by G samples once. On CPU each float32 matmul runs on the kernel (oneDNN or torch's default
GEMM) measured faster for its shape on the running machine (`linear`, `onelayer.rollout.kernels`).

They are used only for models they reproduce (`lean_support`: the module layout of the HF Llama
family, plain `nn.Linear` projections, no hooks, SiLU MLP, full attention everywhere) and, once per
model object, only after both matched the model's own forward on a probe batch (`_verified`);
anything else takes the model's own forward. The decoder also hands out the hidden states entering a
chosen block, which the trainer reuses (frozen prefix).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from onelayer.rollout import kernels

SUPPORTED_TYPES = ("qwen3", "qwen2", "llama", "mistral")
_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


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


def _use_onednn(x: torch.Tensor, w: torch.Tensor, tokens: str = "m") -> bool:
    """oneDNN for this float32 CPU linear when it measured faster on this machine (`rollout.kernels`;
    `tokens`: which dimension counts tokens)."""
    return (kernels._ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 == w.dtype
            and kernels.choose(_rows(x), w.shape[1], w.shape[0], tokens) == "onednn")


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` through oneDNN with its backward (dX = dY W, dW = dY^T X), each product on the kernel
    measured faster for its own shape."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return kernels.onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wt = w.t()
            dx = (kernels.onednn_linear(dy2, wt, None) if _use_onednn(dy2, wt) else dy2 @ w).view(x.shape)
        if ctx.needs_input_grad[1]:
            dyt, xt = dy2.t(), x.reshape(-1, x.shape[-1]).t()
            dw = kernels.onednn_linear(dyt, xt, None) if _use_onednn(dyt, xt, "k") else dyt @ xt.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for a float32 CPU shape where oneDNN measured faster on this machine
    (`onelayer.rollout.kernels`). Same math; the summation order differs, so the two agree to float
    rounding (~1e-6 relative), not bit for bit."""
    if not _use_onednn(x, w):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _OneDNNLinear.apply(x, w, b)
    return kernels.onednn_linear(x, w, b)


def _pair_order(d: int) -> torch.Tensor:
    """Row order within a head that puts each rotary pair (i, i + d/2) side by side: 0, d/2, 1, d/2+1, …"""
    return torch.arange(d).view(2, d // 2).t().reshape(-1)


class LeanDecoder:
    """Prefill + one-token decode steps for one rollout, with its own preallocated KV cache.

    On CPU (`fold`) the weights are gathered once per rollout (they do not change during one): q/k/v and
    gate/up concatenated into one matrix each, each RMSNorm weight folded into the matrix that follows it
    (`(w * y) W^T = y (W diag w)^T`), the attention scale folded into the queries, and the q/k rows of each
    head reordered so that rotary pairs are adjacent — the rotation is then one complex multiply, and
    q·k is unchanged because queries and keys are reordered alike. Residual adds are fused into the
    output projections. On GPU the model's own tensors are used as they are (no copies of a large model).

    `capture` (a block index) records the hidden states entering that block for every position fed in
    (`self.captured`: [B, L, H], rows in the final batch order; zeros where nothing was fed).
    """

    def __init__(self, model, batch: int, max_len: int, capture: int | None = None, fold: bool | None = None):
        inner = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # fewer, larger ops where per-op overhead dominates (CPU); `fold` overrides (tests run both layouts)
        self.fold = self.device.type == "cpu" if fold is None else fold
        self.embed = inner.embed_tokens
        self.layers = [self._gather(b) for b in inner.layers]
        self.head = self._fold([(model.lm_head.weight, model.lm_head.bias)], inner.norm)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        if self.fold:  # paired layout: one complex factor per pair, [max_len, d/2]
            self.rot = torch.complex(cos[0, :, : d // 2].float(), sin[0, :, : d // 2].float())
        else:  # [max_len, head_dim], exactly the model's rotary table
            self.cos, self.sin = cos[0], sin[0]
        shape = (batch, self.kv_heads, max_len, d)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.capture = capture
        self.captured = (torch.zeros(batch, max_len, cfg.hidden_size, dtype=self.dtype, device=self.device)
                         if capture is not None else None)

    def _fold(self, weights, norm) -> dict:
        """One projection from `norm`'s output through `weights` [(W, b), …] (concatenated and with the norm
        weight folded in on CPU)."""
        bias = None
        if any(b is not None for _, b in weights):
            bias = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in weights]
        if not self.fold:
            return {"w": [w for w, _ in weights], "b": bias, "norm_w": norm.weight, "eps": _eps(norm)}
        w = torch.cat([w for w, _ in weights]) * norm.weight.to(weights[0][0].dtype)
        return {"w": [w], "b": None if bias is None else [torch.cat(bias)], "norm_w": None, "eps": _eps(norm)}

    def _gather(self, block) -> dict:
        attn, mlp = block.self_attn, block.mlp
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q, k = (attn.q_proj.weight, attn.q_proj.bias), (attn.k_proj.weight, attn.k_proj.bias)
        qn = getattr(attn, "q_norm", None)
        qn_w, kn_w = (qn.weight, attn.k_norm.weight) if qn is not None else (None, None)
        if self.fold:  # pair rotary dimensions and pre-scale the queries (see the class docstring)
            order = _pair_order(d).to(self.device)

            def reorder(w, b, heads):
                idx = (torch.arange(heads, device=self.device)[:, None] * d + order).reshape(-1)
                return w[idx], None if b is None else b[idx]

            q, k = reorder(*q, h), reorder(*k, kvh)
            if qn is not None:
                qn_w, kn_w = qn_w[order] * d**-0.5, kn_w[order]
            else:
                q = (q[0] * d**-0.5, None if q[1] is None else q[1] * d**-0.5)
        qk_norm = None
        if qn is not None:  # Qwen3: per-head RMSNorm of q and k, one weight row per head
            qk_norm = (torch.cat([qn_w.expand(h, -1), kn_w.expand(kvh, -1)]), _eps(qn))
        return {
            "qkv": self._fold([q, k, (attn.v_proj.weight, attn.v_proj.bias)], block.input_layernorm),
            "qk_norm": qk_norm, "o": (attn.o_proj.weight, attn.o_proj.bias),
            "gate_up": self._fold([(mlp.gate_proj.weight, mlp.gate_proj.bias), (mlp.up_proj.weight, mlp.up_proj.bias)],
                                  block.post_attention_layernorm),
            "down": (mlp.down_proj.weight, mlp.down_proj.bias),
        }

    @staticmethod
    def _project(x, proj):
        """rms_norm(x) (weight folded or applied) through the projection's matrices, concatenated."""
        y = torch.rms_norm(x.float(), (x.shape[-1],), None, proj["eps"]).to(x.dtype)
        if proj["norm_w"] is not None:
            y = proj["norm_w"] * y
        bias = proj["b"] or [None] * len(proj["w"])
        outs = [linear(y, w, b) for w, b in zip(proj["w"], bias)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def _rotary(self, positions):
        """The rotary factors at `positions` [B, S], gathered once per forward for every layer."""
        if self.fold:
            return self.rot[positions][:, :, None]
        return self.cos[positions][:, :, None], self.sin[positions][:, :, None]

    def _rotate(self, x, rotary):
        """Rotary embedding of x [B, S, heads, d] with the factors from `_rotary`."""
        if self.fold:  # rows were reordered into adjacent pairs: one complex multiply
            z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * rotary
            return torch.view_as_real(z).flatten(-2).to(x.dtype)
        cos, sin = rotary
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _residual(self, x, a, w, b):
        """x + a W^T (+ b); where oneDNN runs this shape on CPU, the add is fused into its matmul."""
        if self.fold and _use_onednn(a, w):
            return torch.ops.mkldnn._linear_pointwise.binary(a, x, w, b, "add")
        return x + linear(a, w, b)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `ids` [B, S] at cache slots start..start+S-1 (rotary positions `positions` [B, S]); queries
        attend to slots 0..start+S-1 under the bool `mask` [B, 1, S, start+S] (None: all). `rows` maps the
        batch rows to rows of `captured`. Returns the logits of the last position, [B, V]."""
        B, S = ids.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        end = start + S
        scale = 1.0 if self.fold else d**-0.5  # folded into the queries on CPU
        x = self.embed(ids)
        rotary = self._rotary(positions)
        masked_out = ~mask if S == 1 and mask is not None else None  # decode masks scores by hand
        for i, layer in enumerate(self.layers):
            if i == self.capture:
                self.captured[rows if rows is not None else slice(0, B), start:end] = x
            qkv = self._project(x, layer["qkv"]).view(B, S, h + 2 * kvh, d)
            qk, v = qkv[:, :, : h + kvh], qkv[:, :, h + kvh :]
            if layer["qk_norm"] is not None:
                w, eps = layer["qk_norm"]
                qk = w * torch.rms_norm(qk.float(), (d,), None, eps).to(qk.dtype)
            qk = self._rotate(qk, rotary)  # [B, S, h + kvh, d]
            self.k[i][:B, :, start:end] = qk[:, :, h:].transpose(1, 2)
            self.v[i][:B, :, start:end] = v.transpose(1, 2)
            keys, values = self.k[i][:B, :, :end], self.v[i][:B, :, :end]
            if S == 1:  # decode: grouped-query attention as two small matmuls, no K/V repeat
                q = qk[:, 0, :h].reshape(B, kvh, h // kvh, d)
                scores = q @ keys.transpose(-1, -2)  # [B, kvh, g, end]
                if scale != 1.0:
                    scores = scores * scale
                if masked_out is not None:
                    scores = scores.masked_fill(masked_out, float("-inf"))
                a = (scores.softmax(-1) @ values).reshape(B, 1, h * d)
            else:
                q = qk[:, :, :h].transpose(1, 2)
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=kvh != h, scale=scale)
                a = a.transpose(1, 2).reshape(B, S, h * d)
            x = self._residual(x, a, *layer["o"])
            g, u = self._project(x, layer["gate_up"]).chunk(2, -1)
            x = self._residual(x, F.silu(g) * u, *layer["down"])
        return self._project(x[:, -1], self.head).float()

    def repeat_rows(self, index: torch.Tensor) -> None:
        """Cache rows become `index` (repeat each prompt's rows G times; drop finished rows)."""
        n = len(index)
        for i in range(len(self.layers)):
            self.k[i][:n] = self.k[i].index_select(0, index)
            self.v[i][:n] = self.v[i].index_select(0, index)


def _verified(model, tol: float) -> bool:
    """Do the lean paths (sampling: prefill and one decode step; training) give the model's own numbers on a
    small probe (left padding, shared prompts)?
    Checked once per model object."""
    if model in _VERIFIED:
        return _VERIFIED[model]
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
            got = lean_sequence_logprobs(model, rows, rmask, 3, torch.tensor([0, 0, 1, 1], device=device))
            want = torch.log_softmax(ref[:, 2:5], -1).gather(-1, ids[:, 3:, None]).squeeze(-1).repeat_interleave(2, 0)
            ok = ok and bool((got - want).abs().max() <= tol * scale)
    except Exception:  # noqa: BLE001 - any failure means: use the model's own forward
        ok = False
    _VERIFIED[model] = ok
    return ok


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
    if not _verified(model, 1e-4 if p.dtype == torch.float32 else 3e-2):
        return "its logits did not match the model's own forward on the probe batch"
    return None


def forward_path(model) -> str:
    """Which forward the rollout and training use for `model`: 'lean', or 'hf (reason)'."""
    reason = _runtime_reason(model)
    return "lean" if reason is None else f"hf ({reason})"


# --------------------------------------------------------------------------------------------- training


def _apply(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def _norm(x: torch.Tensor, norm) -> torch.Tensor:
    """HF's RMSNorm: float32 statistics, weight applied in the input dtype."""
    return norm.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, _eps(norm)).to(x.dtype)


def lean_sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                           prompt_index: torch.Tensor | None = None, *, temperature: float = 1.0,
                           block_input: torch.Tensor | None = None, block_index: int | None = None) -> torch.Tensor:
    """`rollout.sequence_logprobs` for Llama-family models, differentiable, with each prompt computed once.

    Rows with the same `prompt_index` share their prompt (the G samples of one prompt): the prompt's
    positions go through the blocks once, and each row's completion attends to that shared prompt's keys
    and values (autograd sums the rows' gradients into it). All tokens of both parts run through the
    linear and elementwise ops as one flat [tokens, H] matrix. With `block_input` the forward starts at
    block `block_index` on those hidden states (frozen-prefix reuse). Returns FloatTensor[B, T].
    """
    inner = model.model
    cfg = model.config
    B, L = input_ids.shape
    P, T = prompt_len, L - prompt_len
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
    pos = torch.cat([positions[rep, :P].reshape(-1), positions[:, P:].reshape(-1)])

    if block_input is None:
        start = 0
        x = inner.embed_tokens(torch.cat([input_ids[rep, :P].reshape(-1), input_ids[:, P:].reshape(-1)]))
    else:
        start = block_index
        x = torch.cat([block_input[rep, :P].reshape(N * P, -1), block_input[:, P:].reshape(B * T, -1)])
    cos, sin = inner.rotary_emb(x[:1], pos[None])
    cos, sin = cos[0][:, None], sin[0][:, None]  # [tokens, 1, d]

    prompt_mask = causal_allowed(pmask)
    ar_t = torch.arange(T, device=device)
    comp_mask = torch.cat([pmask[inv][:, None, None, :].expand(B, 1, T, P),
                           (ar_t[None, :] <= ar_t[:, None]).expand(B, 1, T, T)], -1)  # [B, 1, T, P+T]
    n_p = N * P

    # rotate_half(x) * sin == roll(x, d/2) * sin with the first half's sign flipped: a roll has a cheap
    # backward, where slicing + cat allocate and copy full-size gradients
    half = d // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
    for block in inner.layers[start:]:
        attn, mlp = block.self_attn, block.mlp
        y = _norm(x, block.input_layernorm)
        # separate projections: slicing one fused output would cost a full-size gradient copy per slice
        q, k, v = (_apply(attn.q_proj, y).view(-1, h, d), _apply(attn.k_proj, y).view(-1, kvh, d),
                   _apply(attn.v_proj, y).view(-1, kvh, d))
        if getattr(attn, "q_norm", None) is not None:
            q, k = _norm(q, attn.q_norm), _norm(k, attn.k_norm)
        q = q * cos + q.roll(half, -1) * sin
        k = k * cos + k.roll(half, -1) * sin
        # prompt tokens attend within their prompt; completion tokens to their prompt's and their own
        kp, vp = k[:n_p].view(N, P, kvh, d).transpose(1, 2), v[:n_p].view(N, P, kvh, d).transpose(1, 2)
        kc, vc = k[n_p:].view(B, T, kvh, d).transpose(1, 2), v[n_p:].view(B, T, kvh, d).transpose(1, 2)
        ap = F.scaled_dot_product_attention(q[:n_p].view(N, P, h, d).transpose(1, 2), kp, vp, attn_mask=prompt_mask,
                                            enable_gqa=kvh != h)
        # index_select, not kp[inv]: its backward (index_add) sums the rows' gradients into their shared prompt
        # in a fixed order; advanced indexing's accumulating backward did not on 2+ threads (runs drifted)
        ac = F.scaled_dot_product_attention(q[n_p:].view(B, T, h, d).transpose(1, 2), torch.cat([kp.index_select(0, inv), kc], 2),
                                            torch.cat([vp.index_select(0, inv), vc], 2), attn_mask=comp_mask, enable_gqa=kvh != h)
        a = torch.cat([ap.transpose(1, 2).reshape(n_p, h * d), ac.transpose(1, 2).reshape(B * T, h * d)])
        x = x + _apply(attn.o_proj, a)
        y = _norm(x, block.post_attention_layernorm)
        x = x + _apply(mlp.down_proj, F.silu(_apply(mlp.gate_proj, y)) * _apply(mlp.up_proj, y))

    # positions P-1 .. P+T-2 predict tokens P .. P+T-1: the prompt's last position, then completion 0..T-2
    last = torch.cat([x[:n_p].view(N, P, -1)[:, -1].index_select(0, inv)[:, None], x[n_p:].view(B, T, -1)[:, : T - 1]], 1)
    logits = _apply(model.lm_head, _norm(last, inner.norm)).float()
    if temperature != 1.0:
        logits = logits / temperature
    target = input_ids[:, P:]
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return logp.masked_fill(attention_mask[:, P:] == 0, 0.0)
