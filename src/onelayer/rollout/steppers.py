"""The rollout's two steppers: prefill, repeat each prompt's cache G times, drop finished rows, decode one
token. `_HFStepper` runs any causal LM's own forward with a transformers cache; `_LeanStepper` runs
`onelayer.policy.decoder.LeanDecoder` for the Llama-family models it was verified on."""

from __future__ import annotations

import contextlib

import torch

from onelayer.policy.decoder import LeanDecoder
from onelayer.policy.ops import _forward_kwargs, _mask_4d, causal_allowed, position_ids


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

    def prefill(self, ids, pmask, rows):
        """Prefill prompts `rows` of the batch (`ids`, `pmask`: those rows)."""
        logits = self._forward(ids, self.prefill_mask[rows], position_ids(pmask))
        if self.captured is not None:
            self.captured[: ids.shape[0], : self.P] = self._last
        return logits

    def expand(self, index: torch.Tensor) -> None:
        """Batch row r takes the prefilled row index[r]."""
        _select_cache_rows(self.cache, index)
        if self.captured is not None:
            self.captured[:, : self.P] = self.captured[:, : self.P].index_select(0, index)

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
    """The same steps through `onelayer.policy.decoder.LeanDecoder` (Llama-family models, verified)."""

    def __init__(self, model, pmask: torch.Tensor, G: int, T: int, capture: int | None, block_path: str | None):
        N, P = pmask.shape
        self.P = P
        self.dec = LeanDecoder(model, N * G, P + T, capture)
        self.captured = self.dec.captured
        # decode: a query sees every written slot except left padding; no padding, no mask needed
        self.step_mask = None if bool(pmask.all()) else torch.cat(
            [pmask.bool(), pmask.new_ones(N, T, dtype=torch.bool)], 1).repeat_interleave(G, 0)[:, None, None, :]

    def close(self) -> None:
        pass

    def prefill(self, ids, pmask, rows):
        """Prefill prompts `rows` of the batch (`ids`, `pmask`: those rows)."""
        return self.dec.forward(ids, position_ids(pmask), 0, causal_allowed(pmask))

    def expand(self, index: torch.Tensor) -> None:
        """Batch row r takes the prefilled row index[r]."""
        self.dec.repeat_rows(index)
        if self.captured is not None:
            self.captured[:, : self.P] = self.captured[:, : self.P].index_select(0, index)

    def keep(self, index: torch.Tensor) -> None:
        self.dec.repeat_rows(index)
        if self.step_mask is not None:
            self.step_mask = self.step_mask[index]

    def decode(self, tok, positions, t: int, rows):
        end = self.P + t + 1
        mask = None if self.step_mask is None else self.step_mask[..., :end]
        return self.dec.forward(tok[:, None], positions, self.P + t, mask, rows=rows)
