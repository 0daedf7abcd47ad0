"""Typed, validated run configuration.

One dataclass holds every setting of a training run, each with a one-line doc (shown by ``--help``).
Values come from a YAML file and/or command-line flags; names follow TRL where TRL has one. An unknown
key or a value of the wrong type is a `ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it and says how to fix it."""


def _f(default, doc: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("tiny-qwen3", "built-in model name (tiny-qwen3, tiny-qwen2), local model directory, or hub name")
    block_path: str | None = _f(None, "dotted attribute path of the decoder blocks' ModuleList, if discovery fails")
    task: str = _f("arith", "task name (arith, gsm8k, math, ...)")
    task_opts: dict = _f({}, "task options, e.g. {difficulty: 2}; on the CLI: --task-opt key=value (repeatable)")
    layers: str = _f("all", "layer spec: all, none, 7, 3,5, 2-5, -1, middle:k, top:k@FILE")
    train_embeddings: bool = _f(False, "also train the input embeddings")
    train_lm_head: bool = _f(False, "also train the LM head (shared with the embeddings when tied)")
    warm_start: bool = _f(True, "supervised warm start of built-in models before RL (cached)")
    prompt_format: str | None = _f(None, "prompt format: raw (the task's terse prompt), fewshot (solved train examples "
                                         "first, stop at newline) or chat (the tokenizer's chat template); default: raw "
                                         "for the character-level built-ins, fewshot for pretrained models")
    fewshot_k: int = _f(4, "prompt_format fewshot: solved train examples before each problem")
    system_prompt: str | None = _f(None, "prompt_format chat: system message (default: the chat template's own)")
    # algorithm
    algo: str = _f("grpo", "algorithm preset: grpo, dr_grpo, gigpo (gigpo: agent tasks)")
    loss_type: str | None = _f(None, "override the preset's loss aggregation: seq-mean-token-mean, seq-mean-token-sum-norm, token-mean")
    scale_rewards: str | None = _f(None, "override the preset's advantage scaling: group, batch, none")
    advantage: str | None = _f(None, "override the preset's advantage estimator (a name registered in "
                                     "onelayer.algos.ADVANTAGES: group, gigpo)")
    beta: float | None = _f(None, "KL coefficient (k3 estimator) against the initial policy; 0 disables the "
                                  "reference; default: the preset's (0 for grpo, dr_grpo and gigpo)")
    epsilon: float = _f(0.2, "PPO clip range (lower, and upper unless epsilon_high is set)")
    epsilon_high: float | None = _f(None, "upper clip range (DAPO clip-higher); defaults to epsilon")
    num_iterations: int = _f(1, "update passes over each batch of rollouts")
    rollout_backend: str = _f("hf", "rollout sampler: hf (onelayer's own, on the policy) or vllm (a colocated vLLM "
                                    "engine; CUDA + pip install 'onelayer[vllm]')")
    vllm_gpu_memory_utilization: float = _f(0.3, "rollout_backend vllm: share of GPU memory the engine may take")
    prefix_reuse: bool = _f(True, "when blocks below the lowest trainable one are frozen, compute their output once "
                                  "per batch (captured during the rollout) and start later forwards there", resume_free=True)
    merge_duplicates: bool = _f(True, "run each update forward once per distinct (sequence, advantage sign), "
                                      "weighted by its count: the same loss, fewer tokens (agent turns repeat)", resume_free=True)
    balance_episodes: bool = _f(True, "agent tasks: weight each turn by 1/(its episode's length) so every episode "
                                      "counts equally in the loss (no effect on single-turn tasks)")
    # rollout
    prompts_per_step: int | None = _f(None, "distinct prompts per RL step (agent tasks: start seeds, each played "
                                      "num_generations times); default: the task's suggestion (16; agent tasks 4)")
    num_generations: int = _f(8, "completions sampled per prompt (the group size G)")
    max_completion_length: int | None = _f(None, "max new tokens per completion; default: the task's suggestion")
    temperature: float = _f(1.0, "sampling temperature for rollouts")
    top_p: float = _f(1.0, "nucleus sampling threshold for rollouts")
    # optimisation
    learning_rate: float | None = _f(None, "AdamW learning rate; default: the task's suggestion (1e-4; agent tasks 1.5e-4)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    layer_lr: dict = _f({}, "learning-rate multipliers per layer spec, e.g. {'top:3@contributions.csv': 2.0} "
                            "(Boost-Bk: --layers all --layer-lr top:k@FILE=2); on the CLI: --layer-lr SPEC=MULT "
                            "(repeatable); later specs win where they overlap; each must name trainable blocks")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mini_batch_size: int | None = _f(None, "completions per optimizer step; default: the whole batch")
    max_steps: int | None = _f(None, "RL steps; default: the task's suggestion (300; agent tasks 150)")
    warmup_steps: int | None = _f(None, "linear learning-rate warmup over the first N steps; default: the task's "
                                        "suggestion (0; agent tasks 15)")
    check_every: int | None = _f(None, "score the policy on check_items held-out train items every N steps (and "
                                       "before training); 0: never; default: the task's suggestion (0; agent tasks 25)")
    check_items: int = _f(50, "train items set aside (never sampled for RL) for the check_every check")
    keep_best: bool = _f(True, "with check_every: end with the weights that scored best on the check (the base "
                               "counts), not the last ones; the eval split is never used to choose")
    # evaluation, logging, checkpoints
    eval_every: int = _f(0, "evaluate on the held-out split every N steps (0: only before and after)", resume_free=True)
    collapse_window: int = _f(10, "collapse guard: steps in its rolling means of reward, KL and invalid-action rate", resume_free=True)
    collapse_fraction: float = _f(0.5, "collapse guard: flag when the rolling reward falls below this fraction of "
                                       "its starting value (for collapse_window steps in a row)", resume_free=True)
    save_every: int = _f(25, "checkpoint every N steps (a killed run resumes from the last one)", resume_free=True)
    save_model: bool = _f(True, "write the trained model to OUT/model with save_pretrained")
    tensorboard: bool = _f(False, "also write TensorBoard logs to OUT/tb", resume_free=True)
    progress: bool = _f(True, "show a progress bar", resume_free=True)
    seed: int = _f(0, "random seed (prompt order, sampling, warm start of the task split)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto", resume_free=True)
    dtype: str = _f("float32", "compute dtype: float32, or bfloat16 / float16 (mixed precision: autocast forwards, "
                               "fp32 trainable weights and AdamW state)")
    frozen_dtype: str | None = _f(None, "storage dtype of frozen tensors (float32, bfloat16, float16); default: dtype")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)", resume_free=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resume_free_keys(cls=TrainConfig) -> frozenset[str]:
    """Settings that may differ when a killed run is resumed (marked `resume_free` on their field): they
    change how the run is watched or how fast it goes, not its result beyond float rounding."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_free"))


def field_docs(cls=TrainConfig) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def _coerce(key: str, value, annotation):
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    hints = typing.get_args(annotation) or (annotation,)
    optional = type(None) in hints
    base = next((h for h in hints if h is not type(None)), str)
    # "null" unsets an optional key; so does "none", except for strings, where it can be a value
    # (scale_rewards=none means "no scaling", not "the preset's scaling").
    unset = ("null",) if base is str else ("none", "null")
    if value is None or (isinstance(value, str) and value.lower() in unset and optional):
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must not be empty (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {base.__name__}") from None


def make_config(values: dict, cls=TrainConfig):
    """Build a config from a dict, rejecting unknown keys (with a suggestion) and bad types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            close = difflib.get_close_matches(norm, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        out[norm] = _coerce(norm, value, hints[norm])
    cfg = cls(**out)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    from onelayer.algos import ADVANTAGES, LOSS_AGGREGATIONS, PRESETS, SCALES
    from onelayer.tasks.prompts import PROMPT_FORMATS

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg} (got {getattr(cfg, key)!r})")

    need(cfg.algo in PRESETS, "algo", f"must be one of {', '.join(PRESETS)}")
    need(cfg.loss_type is None or cfg.loss_type in LOSS_AGGREGATIONS, "loss_type", f"must be one of {', '.join(LOSS_AGGREGATIONS)}")
    need(cfg.advantage is None or cfg.advantage in ADVANTAGES, "advantage", f"must be one of {', '.join(ADVANTAGES)}")
    need(cfg.scale_rewards is None or cfg.scale_rewards in SCALES, "scale_rewards", f"must be one of {', '.join(SCALES)}")
    if cfg.algo in PRESETS and (cfg.advantage is None or cfg.advantage in ADVANTAGES):
        estimator = ADVANTAGES[cfg.advantage or PRESETS[cfg.algo].advantage]
        need(cfg.scale_rewards is None or cfg.scale_rewards in estimator.scales, "scale_rewards",
             f"the {estimator.name} advantage estimator scales by {' or '.join(estimator.scales)}")
    need(cfg.num_generations >= 2, "num_generations", "must be at least 2 (group advantages need a group)")
    need(cfg.prompts_per_step is None or cfg.prompts_per_step >= 1, "prompts_per_step", "must be at least 1")
    need(cfg.max_steps is None or cfg.max_steps >= 0, "max_steps", "must be >= 0")
    need(cfg.num_iterations >= 1, "num_iterations", "must be >= 1")
    need(cfg.learning_rate is None or cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.beta is None or cfg.beta >= 0, "beta", "must be >= 0")
    need(0 < cfg.epsilon < 1, "epsilon", "must be in (0, 1)")
    need(cfg.epsilon_high is None or cfg.epsilon_high > 0, "epsilon_high", "must be > 0")
    need(cfg.temperature > 0, "temperature", "must be > 0")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.max_completion_length is None or cfg.max_completion_length >= 1, "max_completion_length", "must be >= 1")
    need(cfg.mini_batch_size is None or cfg.mini_batch_size >= 1, "mini_batch_size", "must be >= 1")
    need(cfg.save_every >= 1, "save_every", "must be >= 1")
    need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(cfg.check_every is None or cfg.check_every >= 0, "check_every", "must be >= 0")
    need(cfg.check_items >= 1, "check_items", "must be >= 1")
    need(cfg.collapse_window >= 1, "collapse_window", "must be >= 1")
    need(0 < cfg.collapse_fraction < 1, "collapse_fraction", "must be in (0, 1)")
    need(cfg.rollout_backend in ("hf", "vllm"), "rollout_backend", "must be hf or vllm")
    need(0 < cfg.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
    need(cfg.dtype in DTYPES, "dtype", "must be float32, bfloat16 or float16")
    need(cfg.frozen_dtype is None or cfg.frozen_dtype in DTYPES, "frozen_dtype", "must be float32, bfloat16 or float16")
    need(cfg.frozen_dtype in (None, "float32") or cfg.dtype != "float32", "frozen_dtype",
         "a half-precision frozen_dtype needs a half-precision compute dtype (--dtype bfloat16 or float16)")
    need(cfg.prompt_format is None or cfg.prompt_format in PROMPT_FORMATS, "prompt_format",
         f"must be one of {', '.join(PROMPT_FORMATS)}")
    need(cfg.fewshot_k >= 1, "fewshot_k", "must be >= 1")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device", "must be cpu, cuda[:N], mps or auto")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def config_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
