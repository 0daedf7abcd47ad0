"""Run setup shared by train and eval: torch threads and seeds, device, and the policy to load."""

from __future__ import annotations

import dataclasses
import random

import torch

from onelayer.config import ConfigError, TrainConfig, task_defaults
from onelayer.models import BUILTIN_MODELS, load_policy, model_num_layers, resolve_real
from onelayer.models.layer_spec import parse_layer_spec
from onelayer.models.layers import block_lr_multipliers
from onelayer.rollout.sampler import LocalSampler
from onelayer.train import allocator
from onelayer.train.warmstart import warm_started

# onelayer's defaults for the settings a task may suggest its own values for (`task_default` on their
# TrainConfig fields): the completion budget (the task's ``max_completion_length``) and ``task.train_defaults``
_TASK_DEFAULTS = task_defaults(TrainConfig)
TASK_TUNABLE = {k: v for k, v in _TASK_DEFAULTS.items() if k != "max_completion_length"}


def completion_budget(cfg: TrainConfig, task, ignore_config: bool = False) -> int:
    """Max new tokens per completion: the config's value, else the task's suggestion (`Task`: 64)."""
    return (None if ignore_config else cfg.max_completion_length) or task.max_completion_length


def with_task_defaults(cfg: TrainConfig, task) -> TrainConfig:
    """``cfg`` with every setting left unset (None) filled in: the task's suggestion, else onelayer's default.

    Settings given explicitly always win. The completion budget is filled the same way.
    """
    suggested = task.train_defaults
    changes = {k: suggested.get(k, v) for k, v in TASK_TUNABLE.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **changes, max_completion_length=completion_budget(cfg, task))


def load_model(cfg: TrainConfig, task, max_new: int, device: str, log):
    """The policy to train: a built-in model is warm-started for the task (cached) unless disabled."""
    source = resolve_real(cfg.model, log)  # a real model's cached directory (never warm-started)
    if cfg.model in BUILTIN_MODELS and cfg.warm_start:
        n = model_num_layers(cfg.model)  # a bad spec or layer rate fails before the warm start
        block_lr_multipliers(parse_layer_spec(cfg.layers, n), n, cfg.layer_lr, cfg.layers)
        source = warm_started(cfg.model, task, max_new_tokens=max_new, log=log)
    # float32 first: layer selection decides which tensors stay float32 (`train.precision`)
    model, tok = load_policy(source, dtype=torch.float32, device=device)
    return model, tok, source


def format_task(cfg: TrainConfig, task, tok, budget_given: bool = False):
    """The task with its prompts in the configured format (or the model's default), and the config with
    that format filled in (so config.json records it) and, unless `budget_given`, the format's completion
    budget."""
    from onelayer.tasks.prompts import PromptFormat, default_format, formatted

    kind = cfg.prompt_format or default_format(cfg.model, tok, task)
    task = formatted(task, tok, PromptFormat(kind, shots=cfg.fewshot_k, system=cfg.system_prompt))
    budget = cfg.max_completion_length if budget_given else completion_budget(cfg, task, ignore_config=True)
    return task, dataclasses.replace(cfg, prompt_format=kind, max_completion_length=budget)


def check_backend(cfg: TrainConfig) -> None:
    """Fail before loading anything when the rollout backend cannot run here."""
    if cfg.rollout_backend == "vllm":
        from onelayer.rollout.vllm_backend import require_vllm

        require_vllm()


def rollout_sampler(cfg: TrainConfig, model, tok, source, out):
    """The rollout's sampler (`rollout.sampler.Sampler`): onelayer's own on the policy, or a colocated vLLM
    engine started from the policy's weights (the trainer pushes the trainable tensors into it before each
    rollout)."""
    if cfg.rollout_backend == "hf":
        return LocalSampler()
    from onelayer.rollout.vllm_backend import VLLMSampler, policy_dir

    return VLLMSampler(policy_dir(model, tok, str(source), out / "vllm_init"), dtype=cfg.dtype,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)


def setup_torch(cfg: TrainConfig) -> None:
    allocator.configure(cfg.cpu_allocator)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device': {name!r} requested but CUDA is not available; use --device cpu")
    return name
