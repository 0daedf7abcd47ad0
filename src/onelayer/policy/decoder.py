"""`LeanDecoder`: prefill and one-token decode steps for Llama-family decoders, straight from the model's
own parameters into a preallocated KV cache (used by `onelayer.rollout.sample`).

Per block: h = rms_norm(x); q, k, v = h Wq, h Wk, h Wv (+ biases); [Qwen3: per-head rms_norm of q and k];
rotary(q, k) with the model's own rotary table; a = attention(q, K, V, mask); x += a Wo;
x += down(silu(h' Wg) * h' Wu); logits = rms_norm(x) W_head. On a CPU a tiny model spends most of a
decode step in per-op and per-module overhead, so this runs the same math in fewer, larger ops.

For a small model (`KEEP_MODEL_BYTES`), a frozen block's gathered weights (and the head's, when frozen) are
kept between rollouts (`_kept`): when one block trains, the other blocks' copies need not be rebuilt for
every rollout, which costs a small model a noticeable share of its rollout in per-op work.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from onelayer.policy import fused, kernels
from onelayer.policy.ops import _eps, _kernel, linear

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (fingerprint, gathered weights)
KEEP_MODEL_BYTES = 128 << 20  # keep gathered weights only for models this small: for larger ones the copies
# would hold a sizeable share of the weights' memory again, and gathering is a small part of their rollout


def _fingerprint(params: list[torch.Tensor]) -> tuple:
    """What says frozen weights are unchanged since they were gathered: each tensor's storage, version counter,
    shape and the sum of a strided sample of its elements (fused AdamW and `.data` edits leave the version
    counter as it was; any real update moves the sample)."""
    sample = [p.detach().reshape(-1)[:: max(1, p.numel() // 64)].sum() for p in params]
    sums = torch.stack(sample).tolist() if sample else []
    return tuple((p.data_ptr(), p._version, p.dtype, tuple(p.shape), s) for p, s in zip(params, sums))


def _kept(module, params: list[torch.Tensor], gather):
    """`gather()`, kept for `module` across decoders while none of `params` requires grad and they are
    unchanged (`_fingerprint`); gathered afresh, and nothing kept, for trainable weights."""
    if any(p.requires_grad for p in params):
        _KEPT.pop(module, None)
        return gather()
    key = _fingerprint(params)
    hit = _KEPT.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = gather()
    _KEPT[module] = (key, value)
    return value


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
        if self.fold and sum(p.numel() * p.element_size() for p in model.parameters()) <= KEEP_MODEL_BYTES:
            # a small model's copies, kept for frozen weights (`_kept`)
            self.layers = [_kept(b, list(b.parameters()), lambda b=b: self._gather(b)) for b in inner.layers]
            # blocks gathered afresh for every rollout (trainable ones): what a per-rollout cost is paid for
            self.fresh = [any(p.requires_grad for p in b.parameters()) for b in inner.layers]
            head = [*model.lm_head.parameters(), *inner.norm.parameters()]
            self.head = _kept(model.lm_head, head, lambda: self._fold([(model.lm_head.weight, model.lm_head.bias)], inner.norm))
        else:  # gathered afresh (on GPU: the model's own tensors)
            self.layers = [self._gather(b) for b in inner.layers]
            self.fresh = [True] * len(self.layers)
            self.head = self._fold([(model.lm_head.weight, model.lm_head.bias)], inner.norm)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        if self.fold:  # paired layout: one complex factor per pair, [max_len, d/2]
            self.rot = torch.complex(cos[0, :, : d // 2].float(), sin[0, :, : d // 2].float())
        else:  # [max_len, head_dim], exactly the model's rotary table
            self.cos, self.sin = cos[0], sin[0]
        # uninitialised: a slot is read only after it was written (the prefill writes every prompt slot, each
        # step its own; dropping rows copies whole rows)
        shape = (batch, self.kv_heads, max_len, d)
        self.k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.written = 0  # cache slots 0..written-1 hold entries (what `repeat_rows` copies)
        self.capture = capture
        self.captured = (torch.zeros(batch, max_len, cfg.hidden_size, dtype=self.dtype, device=self.device)
                         if capture is not None else None)
        self.fused = fused.for_decoder(self)  # the compiled one-token step, where it may serve (policy.fused)

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
        """x + a W^T (+ b); where oneDNN or the split kernel runs this shape on CPU, the add is fused into its matmul."""
        kernel = _kernel(a, w) if self.fold else "default"
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise.binary(a, x, w, b, "add")
        if kernel == "split":
            return kernels.split_linear(a, w, b, x)
        return x + linear(a, w, b)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `ids` [B, S] at cache slots start..start+S-1 (rotary positions `positions` [B, S]); queries
        attend to slots 0..start+S-1 under the bool `mask` [B, 1, S, start+S] (None: all). `rows` maps the
        batch rows to rows of `captured`. Returns the logits of the last position, [B, V]. One-token steps
        go to the compiled step where it was checked and measured faster (`policy.fused`)."""
        self.written = start + ids.shape[1]
        if ids.shape[1] == 1 and self.fused is not None and self.fused.serves(self._forward, ids, positions, start, mask, rows):
            return self.fused(ids, positions, start, mask, rows)
        return self._forward(ids, positions, start, mask, rows)

    def _forward(self, ids, positions, start, mask, rows=None) -> torch.Tensor:
        """`forward` in torch ops."""
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
        """Cache rows become `index` (repeat each prompt's rows G times; drop finished rows); only the slots
        written so far are copied."""
        n, end = len(index), self.written
        for i in range(len(self.layers)):
            self.k[i][:n, :, :end] = self.k[i][:, :, :end].index_select(0, index)
            self.v[i][:n, :, :end] = self.v[i][:, :, :end].index_select(0, index)
