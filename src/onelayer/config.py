"""Typed, validated configuration: a training run (`TrainConfig`) and the plan, eval, bench and sweep commands.

Every setting is a dataclass field with a one-line doc; `onelayer.cli` generates each command's flags and
``--help`` from the fields. Values come from a YAML file and/or those flags; names follow TRL where TRL has
one. An unknown key or a value of the wrong type is a `ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# One dtype vocabulary for every command; the short spellings are accepted and recorded as the long names.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE = {"choices": DTYPES, "aliases": DTYPE_ALIASES}
REQUIRED = dataclasses.MISSING


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it and says how to fix it."""


def _f(default, doc: str, **meta):
    """A documented field (REQUIRED: no default, a required flag). Metadata read by --help, the flags and the
    trainer: default_doc (the default in words, instead of None or []), task_default (None means the task's
    suggestion, else this), choices and aliases (accepted names; old ones mapped onto them), resume_free,
    identity (resume-free, yet in the config hash when not the default: `identity_keys`), flag, metavar,
    negatable=False (--x only, no --no-x), repeat (a list flag given once per item) and no_doc (the help
    of a true/false/list field's --no-x)."""
    meta = {"doc": doc, **meta}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


setting = _f  # its public name, for config dataclasses elsewhere (sweep.SweepSpec)


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("tiny-qwen3", "built-in model name (tiny-qwen3, tiny-qwen2), local model directory, or hub name")
    block_path: str | None = _f(None, "dotted attribute path of the decoder blocks' ModuleList, if discovery fails",
                                default_doc="found by discovery")
    task: str = _f("arith", "task name (arith, gsm8k, math, ...)")
    task_opts: dict = _f({}, "task option, e.g. difficulty=3 (in YAML a mapping: {difficulty: 3})", flag="--task-opt")
    layers: str = _f("all", "layer spec: all, none, 7, 3,5, 2-5, -1, middle:k, top:k@FILE")
    train_embeddings: bool = _f(False, "also train the input embeddings")
    train_lm_head: bool = _f(False, "also train the LM head (shared with the embeddings when tied)")
    warm_start: bool = _f(True, "supervised warm start of built-in models before RL (cached)")
    prompt_format: str | None = _f(None, "prompt format: raw (the task's terse prompt), fewshot (solved train examples "
                                         "first, stop at newline) or chat (the tokenizer's chat template)",
                                   default_doc="raw for the character-level built-ins, fewshot for pretrained models")
    fewshot_k: int = _f(4, "prompt_format fewshot: solved train examples before each problem")
    system_prompt: str | None = _f(None, "prompt_format chat: system message", default_doc="the chat template's own")
    # algorithm
    algo: str = _f("grpo", "algorithm preset: grpo, dr_grpo, gigpo (gigpo: agent tasks)")
    loss_type: str | None = _f(None, "override the preset's loss aggregation: seq-mean-token-mean, seq-mean-token-sum-norm, "
                                     "token-mean", default_doc="the preset's")
    scale_rewards: str | None = _f(None, "override the preset's advantage scaling: group, batch, none",
                                   default_doc="the preset's")
    advantage: str | None = _f(None, "override the preset's advantage estimator (a name registered in "
                                     "onelayer.algos.ADVANTAGES: group, gigpo)", default_doc="the preset's")
    beta: float | None = _f(None, "KL coefficient (k3 estimator) against the initial policy; 0 disables the "
                                  "reference", default_doc="the preset's (0 for grpo, dr_grpo and gigpo)")
    epsilon: float = _f(0.2, "PPO clip range (lower, and upper unless epsilon_high is set)")
    epsilon_high: float | None = _f(None, "upper clip range (DAPO clip-higher)", default_doc="epsilon")
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
                                      "num_generations times)", task_default=16)
    num_generations: int = _f(8, "completions sampled per prompt (the group size G)")
    max_completion_length: int | None = _f(None, "max new tokens per completion", task_default=64)
    temperature: float = _f(1.0, "sampling temperature for rollouts")
    top_p: float = _f(1.0, "nucleus sampling threshold for rollouts")
    # optimisation
    learning_rate: float | None = _f(None, "AdamW learning rate", task_default=1e-4)
    weight_decay: float = _f(0.0, "AdamW weight decay")
    layer_lr: dict = _f({}, "learning-rate multiplier for the blocks a layer spec names, as SPEC=MULT (Boost-Bk: "
                            "--layers all --layer-lr top:k@FILE=2); later specs win where they overlap; each must "
                            "name trainable blocks (in YAML a mapping: {'top:3@FILE': 2.0})", spec_keys=True,
                        metavar="SPEC=MULT", default_doc="1 for every block")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mini_batch_size: int | None = _f(None, "completions per optimizer step", default_doc="the whole batch")
    max_steps: int | None = _f(None, "RL steps", task_default=300)
    warmup_steps: int | None = _f(None, "linear learning-rate warmup over the first N steps", task_default=0)
    check_every: int | None = _f(None, "score the policy on check_items held-out train items every N steps (and "
                                       "before training); 0: never", task_default=0)
    check_items: int = _f(50, "train items set aside (never sampled for RL) for the check_every check")
    keep_best: bool = _f(True, "with check_every: end with the weights that scored best on the check (the base "
                               "counts), not the last ones; the eval split is never used to choose")
    # evaluation, logging, checkpoints
    eval_every: int = _f(0, "evaluate on the held-out split every N steps (0: only before and after)", resume_free=True)
    collapse_window: int = _f(10, "collapse guard: steps in its rolling means of reward, KL and invalid-action rate",
                              resume_free=True)
    collapse_fraction: float = _f(0.5, "collapse guard: flag when the rolling reward falls below this fraction of "
                                       "its starting value (for collapse_window steps in a row)", resume_free=True)
    save_every: int = _f(25, "checkpoint every N steps (a killed run resumes from the last one)", resume_free=True)
    save_model: bool = _f(True, "write the trained model to OUT/model with save_pretrained")
    tensorboard: bool = _f(False, "also write TensorBoard logs to OUT/tb", resume_free=True)
    progress: bool = _f(True, "show a progress bar", resume_free=True)
    seed: int = _f(0, "random seed (prompt order, sampling, warm start of the task split)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto", resume_free=True)
    dtype: str = _f("float32", "compute dtype: float32, or a half-precision one for mixed precision (autocast "
                               "forwards, float32 trainable weights and AdamW state)", **DTYPE)
    frozen_dtype: str | None = _f(None, "storage dtype of frozen tensors", default_doc="the compute dtype", **DTYPE)
    threads: int | None = _f(None, "torch CPU threads", default_doc="torch's choice", resume_free=True)
    cpu_allocator: str = _f("retain", "freed CPU memory: retain (kept in the process and reused, so a step does not "
                                      "page-fault its buffers in afresh; results are bit for bit the same) or system "
                                      "(the C library's default)", choices=("retain", "system"), resume_free=True)
    # one job on several processes (onelayer.train.distributed)
    nproc: int = _f(1, "processes for this one job: onelayer train launches them with torchrun (under torchrun "
                       "its --nproc-per-node counts); prompts_per_step must divide by it", resume_free=True,
                identity=True)
    parallel: str = _f("auto", "with several processes: ddp (replicated weights, gradients all-reduced), fsdp "
                               "(FSDP2: weights, gradients and AdamW state sharded) or auto (fsdp when the model "
                               "plus AdamW state would not fit one device by the planner's estimate, else ddp)",
                       choices=("auto", "ddp", "fsdp"), resume_free=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate_train(self)


def resume_free_keys(cls=TrainConfig) -> frozenset[str]:
    """Settings that may differ when a killed run is resumed (marked `resume_free` on their field): they
    change how the run is watched or how fast it goes, not its result beyond float rounding."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_free"))


def identity_keys(cls=TrainConfig) -> frozenset[str]:
    """Resume-free settings that are still part of what a job is (marked `identity`): `nproc`, since each
    process samples its rollouts from its own stream. A killed run may resume with another value, but a
    finished run of one value is not the job of another (`rundir.config_hash` counts them unless default)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity"))


def task_defaults(cls=TrainConfig) -> dict:
    """onelayer's value of each setting a task may suggest (marked `task_default`), for tasks that do not."""
    return {f.name: f.metadata["task_default"] for f in dataclasses.fields(cls) if "task_default" in f.metadata}


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def default_help(f: dataclasses.Field) -> str:
    """The field's default in words, for --help: its value, or what its metadata says an unset value means."""
    if "task_default" in f.metadata:
        from onelayer.tasks.agent import AgentTask

        agent = AgentTask.train_defaults.get(f.name)
        return (f"the task's suggestion ({f.metadata['task_default']} if it has none"
                + (f"; agent tasks {agent})" if agent is not None else ")"))
    if "default_doc" in f.metadata:
        return f.metadata["default_doc"]
    value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def one_of(names) -> str:
    names = [str(n) for n in names]  # 'a, b or c'
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def csv_list(text: str) -> list:
    """'0, 4,x' -> [0, 4, 'x']: comma-separated items, integers where they are integers."""
    return [int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in text.split(",") if x.strip()]


def _as_list(value, meta, switch: bool):
    """A list (or, `switch`, true/false) from a list, a comma-separated string ('none': []) or one item."""
    if switch and (isinstance(value, bool) or str(value).strip().lower() in ("true", "false")):
        return value if isinstance(value, bool) else value.strip().lower() == "true"
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and not meta.get("repeat"):  # a `repeat` field's items may hold commas
        return [] if value.strip().lower() in ("none", "") else csv_list(value)
    return [value]


def _coerce(key: str, value, annotation, meta, noun: str = "config key"):
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    hints = typing.get_args(annotation) or (annotation,)
    optional = type(None) in hints
    kinds = [h for h in hints if h is not type(None)]
    base = kinds[0] if kinds else str
    # "null" unsets an optional key; so does "none", except for strings, where it can be a value
    # (scale_rewards=none means "no scaling", not "the preset's scaling").
    unset = ("null",) if base is str else ("none", "null")
    if value is None or (isinstance(value, str) and value.lower() in unset and optional):
        if optional:
            return None
        raise ConfigError(f"{noun} {key!r} must not be empty (expected {base.__name__})")
    if list in kinds:
        return _as_list(value, meta, switch=bool in kinds)
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
    except (TypeError, ValueError):
        raise ConfigError(f"{noun} {key!r}: {value!r} is not a valid {base.__name__}") from None
    value = meta.get("aliases", {}).get(str(value), str(value))
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{noun} {key!r}: must be {one_of(meta['choices'])} (got {value!r})")
    return value


def make_config(values: dict, cls=TrainConfig):
    """Build a `cls` from a dict, rejecting unknown keys (with a suggestion), bad types and bad values (its
    `validate`). Errors name the key as the class calls its keys (`KEY_NOUN`, default 'config key')."""
    noun = getattr(cls, "KEY_NOUN", "config key")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            close = difflib.get_close_matches(norm, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown {noun} {key!r}{hint}")
        out[norm] = _coerce(norm, value, hints[norm], fields[norm].metadata, noun)
    missing = [name for name, f in fields.items() if is_required(f) and name not in out]
    if missing:
        raise ConfigError(f"{noun} {missing[0]!r} is required")
    cfg = cls(**out)
    cfg.validate()
    return cfg


def validate_train(cfg: TrainConfig) -> None:
    from onelayer.algos import ADVANTAGES, LOSS_AGGREGATIONS, PRESETS, SCALES
    from onelayer.tasks.prompts import PROMPT_FORMATS

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key {key!r}: {msg} (got {getattr(cfg, key)!r})")

    need(cfg.algo in PRESETS, "algo", f"must be one of {', '.join(PRESETS)}")
    need(cfg.loss_type is None or cfg.loss_type in LOSS_AGGREGATIONS, "loss_type",
         f"must be one of {', '.join(LOSS_AGGREGATIONS)}")
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
    need(cfg.frozen_dtype in (None, "float32") or cfg.dtype != "float32", "frozen_dtype",
         "a half-precision frozen_dtype needs a half-precision compute dtype (--dtype bfloat16 or float16)")
    need(cfg.prompt_format is None or cfg.prompt_format in PROMPT_FORMATS, "prompt_format",
         f"must be one of {', '.join(PROMPT_FORMATS)}")
    need(cfg.fewshot_k >= 1, "fewshot_k", "must be >= 1")
    need(cfg.nproc >= 1, "nproc", "must be at least 1")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
         "must be cpu, cuda[:N], mps or auto")


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


# ----------------------------------------------------------------------------- the other commands' settings


def _positive(cfg, *keys: str, msg: str = "must be a positive integer") -> None:
    for key in keys:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(cfg, key)}: {msg}")


@dataclass
class EvalConfig:
    """`onelayer eval`: where the score goes and how it is measured (what is scored is a TrainConfig)."""

    out: str = _f(REQUIRED, "JSON file for score, ci95, n, task")
    batch_size: int = _f(256, "sequences per generation batch")
    samples: int = _f(1, "also sample this many completions per item and report pass@k (unbiased estimator)")
    pass_k: list = _f([1, 10, 100], "k for pass@k (those <= --samples)")

    def validate(self) -> None:
        _positive(self, "samples", msg="must be at least 1 (1 = greedy score only)")
        given = ",".join(map(str, self.pass_k))
        if any(isinstance(k, bool) or not isinstance(k, int) for k in self.pass_k):
            raise ConfigError(f"--pass-k {given!r}: write comma-separated integers, e.g. 1,10")
        if not self.pass_k or min(self.pass_k) < 1:
            raise ConfigError(f"--pass-k {given!r}: every k must be a positive integer")


@dataclass
class PlanConfig:
    """`onelayer plan`: the model config, layer spec and training shape to plan memory for (`plan_memory`)."""

    model_config: str = _f(REQUIRED, "shipped name (qwen3-0.6b/1.7b/4b/8b, qwen2.5-1.5b/7b), built-in tiny model, "
                                     "config.json or its directory")
    layers: str = _f(REQUIRED, "layer spec to compare with full training: all, 7, 3,5, 2-5, -1, middle:k, top:k@FILE")
    dtype: str = _f("bfloat16", "compute dtype, as train --dtype: activations and KV cache", **DTYPE)
    frozen_dtype: str | None = _f(None, "storage dtype of frozen tensors, as train --frozen-dtype",
                                  default_doc="--dtype", **DTYPE)
    batch_size: int = _f(64, "micro-batch: sequences per forward/backward pass")
    seq_len: int = _f(1024, "tokens per sequence, prompt + completion")
    beta: float = _f(0.0, "KL coefficient; > 0 adds a reference copy of the trainable tensors")
    adam_states: str = _f("float32", "float32 (what onelayer train does): trainable weights, gradients and AdamW "
                                     "moments float32, 16 bytes per trainable parameter, no separate master copy; "
                                     "weights: for comparison, AdamW run directly on --dtype weights (no float32 "
                                     "anywhere), which loses small updates; not what onelayer trains with",
                          choices=("float32", "weights"), aliases={"fp32": "float32"})
    train_embeddings: bool = _f(False, "as in train: also train the input embeddings", negatable=False)
    train_lm_head: bool = _f(False, "as in train: also train the LM head", negatable=False)
    block_path: str | None = _f(None, "dotted path of the decoder blocks' ModuleList", default_doc="found by discovery")
    json: str | None = _f(None, "also write the plan (full, selected, assumptions) to this JSON file",
                          default_doc="not written")
    nproc: int = _f(1, "processes of one job: > 1 adds each process's memory (--batch-size per process)")
    parallel: str = _f("fsdp", "with --nproc > 1: ddp (everything replicated) or fsdp (weights, gradients and AdamW "
                               "state sharded 1/N)", choices=("ddp", "fsdp"))

    def validate(self) -> None:
        _positive(self, "batch_size", "seq_len", "nproc")
        if self.beta < 0:
            raise ConfigError(f"--beta {self.beta}: must be >= 0")


@dataclass
class BenchConfig:
    """`onelayer bench`: the models, steps and rounds to time (`run_bench`) and where the result goes."""

    models: list = _f(["tiny-qwen3", "tiny-qwen3-large"], "built-in models: tiny (tiny-qwen3, tiny-qwen3-large, "
                                                          "tiny-qwen2) or real (smollm2-135m)")
    steps: int = _f(6, "timed steps per run (medians; at least 5)")
    warmup: int = _f(2, "untimed steps first")
    rounds: int = _f(2, "repeat every run this often, in alternating order (pooled)")
    threads: int | None = _f(None, "torch CPU threads in every run", default_doc="torch's choice")
    device: str = _f("cpu", "cpu or cuda")
    no_trl: bool = _f(False, "time onelayer alone (no TRL installed)", negatable=False)
    nproc: int = _f(1, "also time onelayer on this many processes (torchrun; gloo on CPU) with the same global batch, "
                       "against one process")
    trl_allocator: str = _f("system", "TRL's process: system (as TRL ships) or retain (onelayer's cpu_allocator setting, "
                                      "for a comparison on equal allocators)", choices=("system", "retain"))
    json: str | None = _f(None, "write the results (ratios at the top level, per-model runs under 'models')",
                          default_doc="not written")

    def validate(self) -> None:
        from onelayer.models import BUILTIN_MODELS, known_models
        from onelayer.models.real import REAL_MODELS

        for m in self.models:
            if m not in BUILTIN_MODELS and m not in REAL_MODELS:
                raise ConfigError(f"--models: {m!r} is not a built-in tiny model or a built-in real model; choose "
                                  f"from {known_models()}")
        _positive(self, "warmup", msg="at least one warm-up step")
        _positive(self, "nproc")
        _positive(self, "rounds", msg="at least one round")


@dataclass
class SweepConfig:
    """`onelayer sweep`: where the sweep writes and how its jobs run (what runs is a `sweep.SweepSpec`)."""

    out: str = _f("runs/sweep", "sweep directory")
    executor: str = _f("local", "local, processes or ray")
    workers: int = _f(1, "worker processes for --executor processes")
    address: str | None = _f(None, "--executor ray: cluster address ('auto' or HOST:PORT)",
                             default_doc="start a local Ray")
    num_cpus_per_job: float = _f(1.0, "--executor ray: CPUs each job declares")
    num_gpus_per_job: float = _f(0.0, "--executor ray: GPUs each job declares")
    max_retries: int = _f(2, "--executor ray: retries of a job whose worker crashed or that failed")
    procs_per_job: int = _f(1, "--executor ray: processes per job (torchrun inside the job's Ray task, one job over "
                               "them as onelayer train --nproc; --num-cpus-per-job and --num-gpus-per-job cover all)")
    retry_failed: bool = _f(False, "restart jobs that failed before from scratch, instead of resuming them from "
                                   "their checkpoint", negatable=False)

    def validate(self) -> None:
        from onelayer.sweep import EXECUTORS

        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.executor!r}; available: {', '.join(EXECUTORS)}")
        _positive(self, "procs_per_job")
        if self.procs_per_job > 1 and self.executor != "ray":
            raise ConfigError(f"--procs-per-job {self.procs_per_job}: only with --executor ray (or run onelayer train --nproc)")
