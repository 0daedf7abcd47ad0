"""Frozen-prefix reuse: run a decoder from block l on hidden states computed once.

When the lowest trainable block is l (and the embeddings are frozen), everything below block l is the
same function for the behaviour, reference and current policies, so the hidden states entering block l
are too. The rollout captures them (`rollout.sample(capture_block=l)`) or `block_input` computes them
once per batch, and every later forward — reference log-probs, each update pass — starts at block l:
`start_at_block` swaps blocks 0..l-1 for pass-throughs and feeds the stored states into block l. The
embedding lookup still runs (it is a gather; its output is dropped).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from onelayer.models.layers import find_blocks

_TUPLE_BLOCKS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class _Stop(Exception):
    pass


def reuse_block(model: nn.Module, block_path: str | None = None) -> int | None:
    """The block whose input can be reused: the lowest block with a trainable parameter, if it is above
    block 0 and nothing below it (blocks, input embeddings) trains. None otherwise."""
    _, blocks = find_blocks(model, block_path)
    trainable = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    if not trainable or trainable[0] == 0:
        return None
    emb = model.get_input_embeddings()
    if emb is not None and any(p.requires_grad for p in emb.parameters()):
        return None
    block_params = {id(p) for b in blocks for p in b.parameters()}
    head = model.get_output_embeddings()
    after = {id(p) for p in head.parameters()} if head is not None else set()
    # any other trainable parameter outside the blocks (e.g. learned position embeddings) may feed block l
    if any(p.requires_grad and id(p) not in block_params and id(p) not in after for p in model.parameters()):
        return None
    return trainable[0]


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _returns_tuple(model: nn.Module, blocks: nn.ModuleList) -> bool:
    """Do this model's blocks return a tuple (older transformers) or a tensor? Probed once per model."""
    if model in _TUPLE_BLOCKS:
        return _TUPLE_BLOCKS[model]
    seen = {}

    def hook(module, args, output):
        seen["tuple"] = isinstance(output, tuple)
        raise _Stop

    handle = blocks[0].register_forward_hook(hook)
    try:
        device = next(model.parameters()).device
        with torch.no_grad(), contextlib.suppress(_Stop):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    _TUPLE_BLOCKS[model] = seen.get("tuple", False)
    return _TUPLE_BLOCKS[model]


class _PassThrough(nn.Module):
    """Stands in for a skipped block. It keeps the block's plain attributes (`attention_type`, `layer_idx`, …),
    which some models' forwards read from each block (transformers 4.5x: `mask[decoder_layer.attention_type]`)."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        for key, value in vars(block).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        h = _hidden_arg(args, kwargs)
        return (h,) if self.as_tuple else h


@contextlib.contextmanager
def start_at_block(model: nn.Module, index: int, hidden: torch.Tensor, block_path: str | None = None):
    """Within the block, `model(...)` skips blocks 0..index-1 and feeds `hidden` [B, S, H] into block `index`
    (same batch rows and positions as the `input_ids` given to the model)."""
    _, blocks = find_blocks(model, block_path)
    as_tuple = _returns_tuple(model, blocks)
    originals = [blocks[i] for i in range(index)]

    def feed(module, args, kwargs):
        if hidden.shape != _hidden_arg(args, kwargs).shape:
            raise ValueError(f"stored block input {tuple(hidden.shape)} does not match the batch "
                             f"{tuple(_hidden_arg(args, kwargs).shape)}")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[index].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for i in range(index):
            blocks[i] = _PassThrough(originals[i], as_tuple)
        yield
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
        handle.remove()


@torch.no_grad()
def block_input(model: nn.Module, index: int, *, block_path: str | None = None, **inputs) -> torch.Tensor:
    """The hidden states entering block `index` for `model(**inputs)` (the forward stops there)."""
    _, blocks = find_blocks(model, block_path)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = _hidden_arg(args, kwargs)
        raise _Stop

    handle = blocks[index].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with contextlib.suppress(_Stop):
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]
