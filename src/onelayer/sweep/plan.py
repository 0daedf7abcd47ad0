"""Sweep specs and their expansion into jobs with deterministic ids.

A sweep crosses models × tasks × algorithms × layer sets × seeds. Base (`none`), full (`all`) and every
single layer are added automatically; extra layer sets (`middle:2`, `3,5`, `top:2@FILE` …) are
optional. A job id is derived from the job's resolved training config, so the same spec always gives
the same ids and a rerun finds its finished jobs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from onelayer.config import ConfigError, TrainConfig, make_config
from onelayer.models import model_num_layers
from onelayer.models.layers import describe_layers, parse_layer_spec
from onelayer.train.loop import config_hash


@dataclass
class SweepSpec:
    models: list = field(default_factory=lambda: ["tiny-qwen3"], metadata={"doc": "models to sweep"})
    tasks: list = field(default_factory=lambda: ["arith"], metadata={"doc": "tasks to sweep"})
    algos: list = field(default_factory=lambda: ["grpo"], metadata={"doc": "algorithm presets to sweep"})
    seeds: list = field(default_factory=lambda: [0], metadata={"doc": "seeds (each job runs once per seed)"})
    single_layers: bool = field(default=True, metadata={"doc": "add one job per single layer"})
    layer_sets: list = field(default_factory=list, metadata={"doc": "extra layer specs, e.g. [middle:2, '3,5']"})
    train: dict = field(default_factory=dict, metadata={"doc": "training config keys shared by every job"})


@dataclass(frozen=True)
class Job:
    id: str
    condition: str  # model/task/algo, the unit within which contributions are computed
    layers: str
    seed: int
    config: TrainConfig


def make_spec(values: dict) -> SweepSpec:
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown sweep key {key!r}; valid keys: {', '.join(sorted(names))}")
    spec = SweepSpec(**{k: v for k, v in values.items()})
    for key in ("models", "tasks", "algos", "seeds", "layer_sets"):
        value = getattr(spec, key)
        if not isinstance(value, list):
            setattr(spec, key, [value])
    for key in ("models", "tasks", "algos", "seeds"):
        if not getattr(spec, key):
            raise ConfigError(f"sweep key {key!r} must list at least one value")
    forbidden = {"model", "task", "algo", "seed", "layers"} & set(spec.train)
    if forbidden:
        raise ConfigError(f"sweep 'train' keys {sorted(forbidden)} are swept; set them with models/tasks/algos/seeds/layer_sets")
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40]


def plan(spec: SweepSpec) -> list[Job]:
    """Every job of the sweep, in a stable order (base and full first within each condition)."""
    jobs: list[Job] = []
    for model in spec.models:
        n_layers = model_num_layers(model)
        layer_specs = ["none", "all"]
        if spec.single_layers:
            layer_specs += [str(i) for i in range(n_layers)]
        for extra in spec.layer_sets:
            parse_layer_spec(str(extra), n_layers)  # fail early, naming the spec and the layer count
            layer_specs.append(str(extra))
        for task in spec.tasks:
            for algo in spec.algos:
                condition = f"{model}/{task}/{algo}"
                for seed in spec.seeds:
                    for layers in layer_specs:
                        cfg = make_config({**spec.train, "model": model, "task": task, "algo": algo,
                                           "seed": seed, "layers": layers})
                        label = layers if layers in ("none", "all") else describe_layers(parse_layer_spec(layers, n_layers), n_layers)
                        job_id = f"{_slug(model)}-{_slug(task)}-{algo}-{_slug(label)}-s{seed}-{config_hash(cfg)[:8]}"
                        jobs.append(Job(job_id, condition, layers, int(seed), cfg))
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep lists the same job twice (duplicate layer sets or seeds)")
    return jobs
