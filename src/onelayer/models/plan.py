"""Training-memory planner: what full-parameter RL and RL of a layer set cost, from the config alone.

The model is built from its config under ``torch.device("meta")``: every parameter has a shape and
no storage, so even an 8B model plans with no weights on disk and no memory used. The
layer spec is applied with `select_layers`, exactly as the trainer applies it (``all`` is
full-parameter training including embeddings, final norm and head; any other spec trains blocks
only, plus the embeddings / LM head when asked), so the planner and the trainer cannot disagree
about what is trainable.

``--model-config`` is a shipped config name (``qwen3-0.6b``, ``qwen3-1.7b``, ``qwen3-4b``,
``qwen3-8b``, ``qwen2.5-1.5b``, ``qwen2.5-7b``; case-insensitive, an ``org/`` prefix is ignored),
a built-in tiny model (``tiny-qwen3`` …), a ``config.json`` file, or a directory holding one. The
shipped files are the published Hugging Face ``config.json`` of ``Qwen/Qwen3-*`` and
``Qwen/Qwen2.5-*`` (base), in ``onelayer/models/configs/``.

The layout is the trainer's (``onelayer/train/precision.py``): ``--dtype`` is the compute dtype the
forwards run at (under autocast when it is bf16/fp16), trainable tensors and their AdamW moments are
fp32 whatever it is, and frozen tensors are stored at ``--frozen-dtype`` (default: the compute dtype).
Per entry (``full`` and ``selected``), with P = all parameters, N = trainable parameters, t = bytes per
trainable weight (4: fp32), f = bytes per frozen weight and w = bytes at the compute dtype (bf16/fp16
2, fp32 4)::

    param_bytes      = N · t + (P − N) · f      every weight is resident, frozen or not
    grad_bytes       = N · t                    gradients only for trainable tensors, at their dtype
    optimizer_bytes  = N · 2t                   AdamW exp_avg + exp_avg_sq at the trainable dtype; no
                                                master copy (the fp32 trainable weights are that copy)
    reference_bytes  = N · t  if beta > 0       the KL reference is a copy of the trainable tensors only
    activation_bytes = B·T · (L − l0) · a_block · w  +  B·T · V · 4
    total_bytes      = param + grad + optimizer + reference + activation
    kv_cache_bytes   = 2 · L · B · T · n_kv · d_head · w    (rollout; reported, not in the total)

So weights + gradients + optimizer are 16 bytes per trainable parameter and f per frozen one.

Per rank of a job over N processes (``nproc``, ``parallel``; `onelayer.train.distributed`), with the
micro-batch per rank: DDP replicates everything (each term as above). FSDP shards every weight, frozen
ones too, and the gradients, AdamW moments and reference 1/N; a forward or backward also holds the
gathered weights of the root unit (embeddings, final norm, head) and two blocks (the one running and
the one prefetched) at the compute dtype; the rollout and the eval gather every weight::

    fsdp param/grad/optimizer/reference = the term / N
    gathered_bytes = (P_root + 2 · P_block) · w          (in the per-rank total)
    rollout_param_bytes = P · w                           (rollout, eval; not in the total)
``adam_states="weights"`` plans the other common layout for comparison: AdamW run directly on weights
stored at the compute dtype (t = w, no fp32 anywhere), which loses small updates and is not what
``onelayer train`` does.

Activations: B = micro-batch sequences, T = tokens per sequence, L = blocks, V = vocabulary,
l0 = the lowest block that has a trainable parameter (0 when the input embeddings train). Nothing
below l0 requires grad, so autograd saves nothing there; every block from l0 up is counted as if it
saved everything (an upper bound for frozen blocks above l0, which need no weight gradients). When
only the LM head trains, no block is counted; when nothing trains, activations are 0. The
per-token, per-block count ``a_block`` is for a Llama/Qwen-style pre-norm block with SwiGLU MLP and
SDPA/flash attention (no T×T score matrix stored), in elements::

    a_block = 4·h + 3·q + 3·kv + 4·i
        h : block input and its RMSNorm output; residual sum and its RMSNorm output     (4·h)
        q : q before RoPE / qk-norm, q into attention, attention output into o_proj      (3·q)
        kv: k before RoPE / qk-norm, k and v into attention                               (3·kv)
        i : gate and up projections, activation(gate), the product into down_proj         (4·i)

with h = hidden size, q = heads·d_head, kv = kv_heads·d_head, i = MLP intermediate size. The head
term keeps the logits in fp32 (4 bytes) for the log-softmax backward, as the trainer computes
them. Not counted: framework workspace, allocator fragmentation, temporaries of the backward pass,
gradient checkpointing (which would shrink the activation term), autocast's compute-dtype copies of
the fp32 trainable weights that matmuls keep for the backward (up to N · w), and the rollout itself.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from onelayer.config import DTYPE_ALIASES, ConfigError
from onelayer.models import ModelError, _quiet_transformers
from onelayer.models.layers import find_blocks, select_layers
from onelayer.models.tiny import TINY_SHAPES, char_tokenizer, tiny_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the names of `config.DTYPES`
TRAINABLE_DTYPE = "float32"  # onelayer train keeps trainable tensors, and so AdamW's moments, in float32
ADAM_MOMENTS = 2  # exp_avg + exp_avg_sq, each at the trainable tensors' dtype
LOGIT_BYTES = 4  # fp32 logits for the log-softmax backward
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Resolving --model-config


def shipped_configs() -> dict[str, Path]:
    """Shipped config names (lower case, e.g. 'qwen3-8b') → their config.json files."""
    folder = resources.files("onelayer.models") / "configs"
    return {p.name[: -len(".json")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def _config_from_file(path: Path):
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model config {str(path)!r}: cannot read it as JSON ({exc})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ModelError(f"model config {str(path)!r}: no 'model_type' key; is it a Hugging Face config.json?")
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model config {str(path)!r}: {str(exc).splitlines()[0][:200]}") from None


def resolve_config(name_or_path: str):
    """(HF config, where it came from) for a shipped name, a tiny built-in, a config.json or its directory."""
    _quiet_transformers()
    name = str(name_or_path).strip()
    if name in TINY_SHAPES:
        return tiny_config(name, len(char_tokenizer())), f"built-in {name}"
    shipped = shipped_configs()
    key = name.lower().rsplit("/", 1)[-1]  # "Qwen/Qwen3-8B" names the shipped qwen3-8b
    path = Path(name).expanduser()
    if path.is_file():
        return _config_from_file(path), str(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _config_from_file(path / "config.json"), str(path / "config.json")
    if key in shipped:
        return _config_from_file(shipped[key]), f"shipped {key}"
    if path.is_dir():
        raise ModelError(f"model config {name!r}: the directory has no config.json")
    raise ModelError(
        f"unknown model config {name!r}: pass a shipped name ({', '.join(sorted(shipped))}), a built-in "
        f"({', '.join(TINY_SHAPES)}), a config.json file or a directory that holds one"
    )


def meta_model(config) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"cannot build a causal LM from a {type(config).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Shapes and counts


def block_shape(config) -> dict[str, int]:
    """hidden, q width, kv width, MLP intermediate size and vocabulary from an HF config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*keys: str, default=None):
        for key in keys:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ModelError(f"{type(config).__name__}: no hidden size / head count in the config")
    head_dim = first("head_dim", default=hidden // heads)
    kv_heads = first("num_key_value_heads", default=heads)
    return {
        "hidden": hidden,
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "head_dim": head_dim,
        "kv_heads": kv_heads,
        "intermediate": first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        "vocab": first("vocab_size", default=0),
    }


def activation_elements_per_token_per_block(shape: dict[str, int]) -> int:
    """a_block = 4·h + 3·q + 3·kv + 4·i (see the module docstring)."""
    return 4 * shape["hidden"] + 3 * shape["q"] + 3 * shape["kv"] + 4 * shape["intermediate"]


def non_embedding_params(model: nn.Module) -> int:
    """All parameters except the input embeddings and an untied LM head (the model-card convention)."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def lowest_trainable_block(model: nn.Module, block_path: str | None = None) -> int | None:
    """First block whose activations backward needs: 0 if the input embeddings train, the lowest block
    with a trainable parameter otherwise, L if only parameters above the blocks train, None if nothing does."""
    _, blocks = find_blocks(model, block_path)
    if model.get_input_embeddings().weight.requires_grad:
        return 0
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks) if any(p.requires_grad for p in model.parameters()) else None


def training_state_bytes(model: nn.Module, beta: float = 0.0) -> int:
    """The planner's weights + gradients + AdamW moments (+ the KL reference) of a model whose layers are selected,
    from its tensors as stored: every weight, and per trainable one a gradient, two moments and (beta > 0) a
    reference copy at its dtype. Activations are not included."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        total += size * (2 + ADAM_MOMENTS + (beta > 0)) if p.requires_grad else size
    return total


# ---------------------------------------------------------------------------------------------
# The plan


def _normalize_dtype(dtype: str) -> str:
    """The dtype's name in onelayer's vocabulary (`config.DTYPES`; the short aliases fp32, bf16, fp16 map onto it)."""
    key = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if key not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return key


def _per_rank(model: nn.Module, entry: dict, *, nproc: int, parallel: str, w: int, block_path: str | None) -> dict:
    """One rank's share of `entry` in a job of `nproc` processes (see the module docstring)."""
    if parallel == "ddp":
        out = {k: entry[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "reference_bytes", "activation_bytes")}
        out["gathered_bytes"] = 0
        out["rollout_param_bytes"] = entry["param_bytes"]
    else:
        _, blocks = find_blocks(model, block_path)
        block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        root = entry["total_params"] - sum(p.numel() for b in blocks for p in b.parameters())
        out = {k: -(-entry[k] // nproc) for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "reference_bytes")}
        out["activation_bytes"] = entry["activation_bytes"]
        out["gathered_bytes"] = (root + 2 * block) * w
        out["rollout_param_bytes"] = entry["total_params"] * w
    out["total_bytes"] = sum(out[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "reference_bytes",
                                              "activation_bytes", "gathered_bytes"))
    return out


def _entry(model: nn.Module, selection, *, spec: str, shape: dict[str, int], w: int, t: int, f: int,
           tokens: int, beta: float, block_path: str | None) -> dict:
    total, trainable = selection.total_params, selection.trainable_params  # a tied tensor counts once
    lowest = lowest_trainable_block(model, block_path)
    num_layers = selection.num_layers
    if lowest is None:
        activation = 0
    else:
        per_block = activation_elements_per_token_per_block(shape) * w
        activation = tokens * (num_layers - lowest) * per_block + tokens * shape["vocab"] * LOGIT_BYTES
    entry = {
        "layers": spec,
        "layer_indices": selection.indices,
        "lowest_trainable_block": lowest,
        "total_params": total,
        "trainable_params": trainable,
        "param_bytes": trainable * t + (total - trainable) * f,
        "grad_bytes": trainable * t,
        "optimizer_bytes": trainable * ADAM_MOMENTS * t,
        "activation_bytes": activation,
        "reference_bytes": trainable * t if beta > 0 else 0,
        "kv_cache_bytes": 2 * num_layers * tokens * shape["kv_heads"] * shape["head_dim"] * w,
    }
    entry["total_bytes"] = sum(entry[k] for k in
                               ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "reference_bytes"))
    return entry


def _layout(dtype: str, frozen_dtype: str | None, adam_states: str) -> tuple[str, str, str]:
    """(compute, trainable, frozen) dtypes, checked as onelayer train checks --dtype / --frozen-dtype."""
    dtype = _normalize_dtype(dtype)
    frozen = _normalize_dtype(frozen_dtype) if frozen_dtype is not None else dtype
    if adam_states not in (TRAINABLE_DTYPE, "weights"):
        raise ValueError(f"adam_states must be float32 or weights (got {adam_states!r})")
    if dtype == "float32" and frozen != "float32":
        raise ConfigError(f"frozen dtype {frozen} with compute dtype float32: a half-precision frozen dtype needs "
                          "a half-precision compute dtype, as in onelayer train")
    return dtype, TRAINABLE_DTYPE if adam_states == TRAINABLE_DTYPE else dtype, frozen


def plan_memory(
    model_config: str,
    layers: str,
    *,
    dtype: str = "bfloat16",
    frozen_dtype: str | None = None,
    batch_size: int = 64,
    seq_len: int = 1024,
    beta: float = 0.0,
    train_embeddings: bool = False,
    train_lm_head: bool = False,
    block_path: str | None = None,
    adam_states: str = "float32",
    nproc: int = 1,
    parallel: str = "ddp",
) -> dict:
    """Memory of full-parameter training ("full") and of training `layers` ("selected"), in bytes.

    `dtype` is the compute dtype (activations, KV cache); `frozen_dtype` (default: `dtype`) stores the
    frozen tensors; both are named as in `config.DTYPES` (fp32, bf16, fp16 are accepted and recorded
    as float32, bfloat16, float16). `adam_states`: "float32" (what onelayer train does: trainable
    weights, gradients and AdamW moments in float32; alias "fp32") or "weights" (for comparison: AdamW
    run directly on weights at `dtype`, which loses small updates). A half-precision `frozen_dtype`
    with a float32 `dtype` raises ConfigError, as the trainer's config check does.

    `batch_size` is the micro-batch: sequences per forward/backward pass, each `seq_len` tokens
    (prompt + completion). Raises ModelError for an unknown config and LayerSpecError (the trainer's
    message) for a spec that does not fit the model.

    `nproc` > 1 adds each entry's ``per_rank`` memory under `parallel` (ddp or fsdp), `batch_size` per rank.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (got {beta})")
    if nproc < 1 or parallel not in ("ddp", "fsdp"):
        raise ValueError(f"nproc must be positive and parallel ddp or fsdp (got {nproc}, {parallel!r})")
    adam_states = DTYPE_ALIASES.get(adam_states, adam_states)
    dtype, trainable_dtype, frozen_dtype = _layout(dtype, frozen_dtype, adam_states)
    w, t, f = DTYPE_BYTES[dtype], DTYPE_BYTES[trainable_dtype], DTYPE_BYTES[frozen_dtype]
    config, source = resolve_config(model_config)
    shape = block_shape(config)
    model = meta_model(config)
    common = dict(shape=shape, w=w, t=t, f=f, tokens=batch_size * seq_len, beta=beta, block_path=block_path)

    # The trainer's call (train/loop.py): `all` also trains everything outside the blocks.
    full_sel = select_layers(model, "all", block_path=block_path, train_non_block=True)
    full = _entry(model, full_sel, spec="all", **common)
    sel = select_layers(model, layers, block_path=block_path, train_embeddings=train_embeddings,
                        train_lm_head=train_lm_head, train_non_block=layers.strip().lower() == "all")
    selected = _entry(model, sel, spec=layers, **common)
    if nproc > 1:
        for entry in (full, selected):
            entry["per_rank"] = _per_rank(model, entry, nproc=nproc, parallel=parallel, w=w, block_path=block_path)

    a_block = activation_elements_per_token_per_block(shape)
    if adam_states == TRAINABLE_DTYPE:
        optimizer = (f"AdamW: exp_avg + exp_avg_sq in float32 ({ADAM_MOMENTS * t} bytes per trainable parameter); "
                     "no separate master copy: the trainable weights are already float32 (what onelayer train does)")
    else:
        optimizer = (f"AdamW run directly on {dtype} weights: exp_avg + exp_avg_sq at {dtype} "
                     f"({ADAM_MOMENTS * t} bytes per trainable parameter), no master copy"
                     + ("; loses small updates, not what onelayer trains with" if dtype != "float32" else ""))
    return {
        "model_config": str(model_config),
        "config_source": source,
        "architecture": type(model).__name__,
        "layers": layers,
        "num_layers": sel.num_layers,
        "block_path": sel.block_path,
        "non_embedding_params": non_embedding_params(model),
        "dtype": dtype,
        "trainable_dtype": trainable_dtype,
        "frozen_dtype": frozen_dtype,
        "adam_states": adam_states,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "beta": beta,
        "nproc": nproc,
        "parallel": parallel,
        "full": full,
        "selected": selected,
        "total_ratio": selected["total_bytes"] / full["total_bytes"] if full["total_bytes"] else None,
        "assumptions": {
            "weights": f"trainable parameters at {trainable_dtype} ({t} bytes), frozen parameters at "
                       f"{frozen_dtype} ({f} bytes); a tied embedding/head tensor counts once",
            "gradients": f"trainable parameters only, at {trainable_dtype} ({t} bytes); frozen ones have none",
            "optimizer": optimizer,
            "optimizer_bytes_per_trainable_param": ADAM_MOMENTS * t,
            "state_bytes_per_trainable_param": (2 + ADAM_MOMENTS) * t,  # weight + gradient + moments
            "state_bytes_per_frozen_param": f,
            "activations": f"micro-batch {batch_size} x {seq_len} tokens; blocks from the lowest trainable one "
                           f"upward save a_block = 4h + 3q + 3kv + 4i = {a_block} elements per token at the "
                           f"compute dtype {dtype} (Llama/Qwen-style block, SDPA/flash attention, no "
                           "checkpointing); plus float32 logits (batch x seq_len x vocab x 4 bytes) when anything trains",
            "activation_bytes_per_token_per_block": a_block * w,
            "reference": f"beta > 0: one copy of the trainable tensors at {trainable_dtype} (copy_trainable)",
            "kv_cache": f"rollout KV cache for the same batch x seq_len at the compute dtype {dtype}; reported, "
                        "not in total_bytes (rollout and backward do not overlap)",
            "not_counted": "CUDA context, allocator fragmentation, backward temporaries, "
                           + (f"autocast's {dtype} copies of the {trainable_dtype} trainable weights that matmuls "
                              f"keep for the backward (up to {w} bytes per trainable parameter), " if t != w else "")
                           + "rollout logits",
        },
    }


# ---------------------------------------------------------------------------------------------
# Human-readable table


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _blocks(indices: list[int], num_layers: int) -> str:
    from onelayer.models.layer_spec import describe_layers

    label = describe_layers(indices, num_layers)
    return f"0-{num_layers - 1}" if label == "all" else label.removeprefix("L")


def format_plan(plan: dict) -> str:
    """A compact table: one row per memory term, GiB with two decimals, full vs selected."""
    full, sel = plan["full"], plan["selected"]
    n = plan["num_layers"]
    per_param = plan["assumptions"]["state_bytes_per_trainable_param"]
    states = (f"trainable weights + gradients + AdamW states {plan['trainable_dtype']} ({per_param} B/param), "
              f"frozen {plan['frozen_dtype']}")
    if plan["trainable_dtype"] != TRAINABLE_DTYPE:
        states += " (AdamW on the weights as stored: loses small updates; not what onelayer trains with)"
    lines = [
        f"{plan['model_config']}: {plan['architecture']}, {n} blocks, {_count(full['total_params'])} parameters "
        f"({_count(plan['non_embedding_params'])} non-embedding)",
        f"compute {plan['dtype']}; {states}",
        f"micro-batch {plan['batch_size']} x {plan['seq_len']} tokens, beta {plan['beta']:g}",
        "",
        f"{'':<22}{'full (all)':>14}{'selected':>14}",
        f"{'layers':<22}{'all':>14}{sel['layers']:>14}",
        f"{'blocks':<22}{_blocks(full['layer_indices'], n):>14}{_blocks(sel['layer_indices'], n):>14}",
        f"{'trainable params':<22}{_count(full['trainable_params']):>14}{_count(sel['trainable_params']):>14}",
    ]
    rows = (("parameters", "param_bytes"), ("gradients", "grad_bytes"), ("optimizer", "optimizer_bytes"),
            ("activations", "activation_bytes"), ("reference (beta>0)", "reference_bytes"), ("total", "total_bytes"),
            ("kv cache (rollout)", "kv_cache_bytes"))  # the KV cache is reported, not part of the total
    for label, key in rows:
        lines.append(f"{label + ' GiB':<22}{full[key] / GIB:>14.2f}{sel[key] / GIB:>14.2f}")
    if plan["total_ratio"] is not None:
        lines.append(f"selected / full total: {plan['total_ratio']:.1%}")
    if "per_rank" in full:
        lines += ["", f"per rank of {plan['nproc']} processes, {plan['parallel']} (micro-batch {plan['batch_size']} per rank)"]
        rows = (("parameters", "param_bytes"), ("gradients", "grad_bytes"), ("optimizer", "optimizer_bytes"),
                ("activations", "activation_bytes"), ("reference (beta>0)", "reference_bytes"),
                ("gathered units", "gathered_bytes"), ("total", "total_bytes"), ("rollout weights", "rollout_param_bytes"))
        for label, key in rows:
            lines.append(f"{label + ' GiB':<22}{full['per_rank'][key] / GIB:>14.2f}{sel['per_rank'][key] / GIB:>14.2f}")
    return "\n".join(lines)
