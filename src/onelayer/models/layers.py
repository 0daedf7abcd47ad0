"""Layer selection: find decoder blocks, freeze everything else, verify frozen tensors, swap in reference weights.

A *layer* is one decoder block of an HF causal LM: every parameter under that block (attention, MLP
and its norms). Embeddings, the final norm and the LM head stay frozen unless asked for. The spec
grammar (which blocks "middle:1" names) is in `onelayer.models.layer_spec`.

Typical use, before any optimizer exists::

    sel = select_layers(model, "middle:1")                  # freeze all, unfreeze block(s)
    fingerprint = fingerprint_frozen(model)                 # hashes, no second copy of the model
    ref = copy_trainable(model)                             # reference policy = one copy of the blocks
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-5)
    ...
    with torch.no_grad(), swap_weights(model, ref):
        ref_logits = model(input_ids).logits                # the reference (pre-RL) policy
    ...
    ok, changed = frozen_unchanged(model, fingerprint)      # recorded in the job's eval.json
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from onelayer.models.layer_spec import LayerSpecError, describe_layers, parse_layer_spec

# Tried in order before discovery; covers Llama/Qwen2/Qwen3/Mistral/Phi/Gemma, GPT-2/GPT-J/Falcon,
# GPT-NeoX/Pythia, OPT, MPT, and multimodal wrappers whose text model sits one level deeper.
KNOWN_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "layers",
    "h",
)


# ---------------------------------------------------------------------------------------------
# Finding the decoder blocks


def num_hidden_layers(model: nn.Module) -> int | None:
    """The model's block count from its config (num_hidden_layers / n_layer / text_config), if any."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _module_list_at(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.ModuleList) else None


def _homogeneous(blocks: nn.ModuleList) -> bool:
    return len(blocks) > 0 and len({type(b) for b in blocks}) == 1


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the decoder blocks of an HF causal LM.

    `path` (e.g. "model.layers") is used as given. Otherwise known paths are tried, then the largest
    (by parameter count) ModuleList whose length is the config's layer count and whose children all
    share one class.
    """
    expected = num_hidden_layers(model)
    if path is not None:
        blocks = _module_list_at(model, path)
        if blocks is None:
            raise LayerSpecError(
                f"block path {path!r} does not name an nn.ModuleList in {type(model).__name__}"
                f" (config says {expected} layers)"
            )
        return path, blocks
    for known in KNOWN_BLOCK_PATHS:
        blocks = _module_list_at(model, known)
        # No same-class check here: hybrid models may mix block classes under a known path.
        if blocks is not None and len(blocks) > 0 and (expected is None or len(blocks) == expected):
            return known, blocks
    candidates = [
        (sum(p.numel() for p in module.parameters()), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and _homogeneous(module)
        and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise LayerSpecError(
            f"cannot find the decoder blocks of {type(model).__name__} (config says {expected} layers): "
            "no nn.ModuleList of that length with blocks of one class; pass the attribute path "
            "explicitly (block_path / --block-path, e.g. 'model.layers')"
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


# ---------------------------------------------------------------------------------------------
# Freezing


@dataclass
class Selection:
    """What select_layers made trainable."""

    spec: str
    indices: list[int]
    num_layers: int
    block_path: str
    trainable_names: list[str]
    trainable_params: int
    total_params: int
    label: str


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; a tied tensor counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors to hand the optimizer: only those that require grad."""
    return [p for p in model.parameters() if p.requires_grad]


def select_layers(
    model: nn.Module,
    spec: str,
    *,
    block_path: str | None = None,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    train_non_block: bool = False,
) -> Selection:
    """Freeze every parameter, then unfreeze the blocks chosen by `spec`. Call before building the optimizer.

    `train_embeddings` unfreezes the input token embeddings, `train_lm_head` the output projection.
    When the LM head is tied to the embeddings (one shared tensor), either flag trains that shared
    tensor, so both the embeddings and the head change. `train_non_block` unfreezes every parameter
    outside the blocks (embeddings, position embeddings, final norm, LM head): with spec 'all' that is
    full-parameter training.
    """
    path, blocks = find_blocks(model, block_path)
    indices = parse_layer_spec(spec, len(blocks))
    for p in model.parameters():
        p.requires_grad_(train_non_block)
    for p in blocks.parameters():
        p.requires_grad_(False)
    for i in indices:
        for p in blocks[i].parameters():
            p.requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    if train_lm_head:
        head = model.get_output_embeddings()
        if head is None:
            raise LayerSpecError(f"{type(model).__name__} has no output embeddings (LM head) to train")
        for p in head.parameters():
            p.requires_grad_(True)
    trainable, total = count_parameters(model)
    return Selection(
        spec=spec,
        indices=indices,
        num_layers=len(blocks),
        block_path=path,
        trainable_names=[n for n, p in model.named_parameters() if p.requires_grad],
        trainable_params=trainable,
        total_params=total,
        label=describe_layers(indices, len(blocks)),
    )


def block_lr_multipliers(indices: list[int], num_layers: int, layer_lr: dict[str, float], layers: str = "") -> dict[int, float]:
    """Per trainable block, its learning-rate multiplier: `layer_lr` maps layer specs to multipliers
    (later specs win where they overlap); blocks no spec names keep 1. A spec that names a frozen block
    is a LayerSpecError (its rate would silently do nothing)."""
    mult = {i: 1.0 for i in indices}
    for spec, factor in layer_lr.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise LayerSpecError(f"layer_lr {spec}={factor!r}: the multiplier must be a positive number")
        chosen = parse_layer_spec(spec, num_layers)
        frozen = [i for i in chosen if i not in mult]
        if frozen:
            raise LayerSpecError(f"layer_lr {spec}={factor}: block(s) {frozen} are frozen by --layers "
                                 f"{layers!r} (trainable: {indices}); a learning rate there would change nothing")
        mult.update({i: float(factor) for i in chosen})
    return mult


def param_groups(model: nn.Module, selection: Selection, multipliers: dict[int, float]) -> list[dict]:
    """AdamW parameter groups, one per distinct multiplier (`lr_mult`; parameters outside the blocks, such
    as the embeddings of a full run, get 1), in parameter order within each group. With one multiplier
    this is one group holding `trainable_parameters(model)`, exactly."""
    _, blocks = find_blocks(model, selection.block_path)
    owner = {id(p): i for i in selection.indices for p in blocks[i].parameters()}
    groups: dict[float, list[nn.Parameter]] = {}
    for p in trainable_parameters(model):
        groups.setdefault(multipliers.get(owner.get(id(p)), 1.0), []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in sorted(groups.items())]


# ---------------------------------------------------------------------------------------------
# Frozen-tensor verification (hashes, not a second copy of the model)


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b of a tensor's exact bytes, plus its dtype and shape (so a reinterpretation also shows)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    return tensors


def fingerprint_frozen(model: nn.Module) -> dict[str, str]:
    """Hash every frozen parameter and every buffer (rotary caches included: they must not change either)."""
    fingerprint = {name: tensor_digest(b) for name, b in model.named_buffers()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            fingerprint[name] = tensor_digest(p)
    return fingerprint


def frozen_unchanged(model: nn.Module, fingerprint: dict[str, str], tensors: dict | None = None) -> tuple[bool, list[str]]:
    """(all bit-identical?, names that changed or disappeared) against a fingerprint_frozen result. `tensors`:
    the parameters at full size when the model's own are shards (FSDP: a gathered state dict)."""
    tensors = _named_tensors(model) if tensors is None else {**dict(model.named_buffers()), **tensors}
    changed = [
        name for name, digest in fingerprint.items()
        if name not in tensors or tensor_digest(tensors[name]) != digest
    ]
    return not changed, changed


# ---------------------------------------------------------------------------------------------
# Reference policy without a second model


def copy_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the trainable parameters only: memory is one copy of the selected blocks."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swap_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily put `weights` (e.g. from copy_trainable) into the named parameters; restore on exit.

    Inside, a forward pass computes the reference policy. Use it under torch.no_grad(): autograd
    graphs built inside would refer to the swapped-in tensors. Restoring happens even on exception.
    """
    params = dict(model.named_parameters())
    for name, w in weights.items():
        if name not in params:
            raise KeyError(f"swap_weights: model has no parameter {name!r}")
        p = params[name]
        if w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
            raise ValueError(
                f"swap_weights: {name!r} is {tuple(p.shape)} {p.dtype} on {p.device}, "
                f"got {tuple(w.shape)} {w.dtype} on {w.device}"
            )
    saved: dict[str, torch.Tensor] = {}
    try:
        for name, w in weights.items():
            saved[name] = params[name].data
            params[name].data = w
        yield model
    finally:
        for name, data in saved.items():
            params[name].data = data
