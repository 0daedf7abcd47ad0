"""Policy loading: built-in tiny models, local directories and hub names, through the Auto classes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from onelayer.models.tiny import TINY_SHAPES, char_tokenizer, tiny_config

BUILTIN_MODELS = tuple(TINY_SHAPES)  # built from configs and warm-started on the task


class ModelError(ValueError):
    """A model name or path that cannot be loaded; the message says what was tried."""


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _hub_reachable(host: str = "huggingface.co") -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    import socket

    try:
        socket.getaddrinfo(os.environ.get("HF_ENDPOINT", host).split("://")[-1].split("/")[0], 443)
        return True
    except OSError:
        return False


def build_tiny(name: str, seed: int = 0):
    """A randomly initialised built-in tiny model and its character tokenizer."""
    from transformers import AutoModelForCausalLM

    if name not in TINY_SHAPES:
        raise ModelError(f"unknown built-in model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}")
    _quiet_transformers()
    tok = char_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok)))
    return model, tok


def load_policy(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an HF causal LM and its tokenizer from a local directory or a hub name.

    Built-in names (``tiny-qwen3``, ``tiny-qwen2``) give a random-weight model here; the trainer
    warm-starts them (see ``onelayer.train.warmstart``) before RL.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    name = str(name_or_path)
    if name in TINY_SHAPES:
        model, tok = build_tiny(name)
        return model.to(device=device, dtype=dtype), tok
    name = resolve_real(name)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ModelError(
            f"model {name!r}: no config.json in that directory; pass a directory written by "
            f"save_pretrained, a .gguf file, a hub name, or one of {known_models()}"
        )
    # The local HF cache first; the hub only if it resolves (otherwise hub clients retry for minutes).
    offline = not _hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {name!r}: it is not a built-in ({known_models()}), "
            f"not a local model directory, and the hub could not provide it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.to(device), tok


def resolve_real(name: str, log=print) -> str:
    """A built-in real model name (``smollm2-135m``) or a ``.gguf`` path → its cached HF directory; other
    names unchanged."""
    from onelayer.models import real

    if name in real.REAL_MODELS or real.is_gguf(name):
        return str(real.converted_dir(name, log=log))
    return name


def known_models() -> str:
    from onelayer.models.real import REAL_MODELS

    return ", ".join((*BUILTIN_MODELS, *REAL_MODELS))


def model_num_layers(name_or_path: str) -> int:
    """Decoder block count from the config alone (no weights), for planning sweeps."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if name in TINY_SHAPES:
        return TINY_SHAPES[name]["num_hidden_layers"]
    name = resolve_real(name)
    _quiet_transformers()
    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=not _hub_reachable())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of model {name!r} ({str(exc).splitlines()[0][:200]})") from None
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ModelError(f"model {name!r}: its config has no layer count (num_hidden_layers / n_layer)")

