"""Sweep specs and their expansion into jobs with deterministic ids.

A sweep crosses models × tasks × algorithms × layer sets × seeds. Base (`none`), full (`all`) and every
single layer are added automatically, and the full job also runs with `full_seeds` (default: seed 1 too);
extra layer sets (`middle:2`, `3,5`, `top:2@FILE` …) are optional. A job id is derived from the job's
resolved training config, so the same spec always gives the same ids and a rerun finds its finished jobs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

from onelayer.config import ConfigError, TrainConfig, make_config, setting
from onelayer.io import slug
from onelayer.rundir import config_hash


@dataclass
class SweepSpec:
    """What a sweep runs (its YAML keys; the sweep's flags are generated from these fields)."""

    KEY_NOUN: ClassVar[str] = "sweep key"
    models: list = setting(["tiny-qwen3"], "models to sweep")
    tasks: list = setting(["arith"], "tasks to sweep")
    algos: list = setting(["grpo"], "algorithm presets to sweep")
    seeds: list = setting([0], "seeds; each job runs once per seed")
    single_layers: bool | list = setting(True, "one job per single layer: true (every block), false, or only "
                                               "the listed block indices (e.g. 0,4,8,12)", metavar="LIST",
                                         no_doc="no single-layer jobs")
    full_seeds: list = setting([1], "the full-parameter job also runs with these seeds (its base scores come with "
                                    "it), so the S_full - S_base every C_l divides by is measured on two seeds and "
                                    "C_l CIs cover its seed variation; none for no extra seeds", metavar="SEEDS")
    extreme_seeds: list = setting([], "after the first pass, rerun full and the best and worst single layer (by the "
                                      "first seed's contributions) with these seeds", metavar="SEEDS",
                                  default_doc="no second pass")
    layer_sets: list = setting([], "extra layer spec to run, e.g. middle:2 or 3,5", flag="--layer-set", repeat=True)
    pairs: list = setting([], "a layer spec whose blocks are also trained in pairs (every pair of them), for the "
                              "additivity test, e.g. top:3@contributions.csv", flag="--pairs", repeat=True)
    lr_grid: list = setting([], "learning rates: every trained layer set also runs at each, its rate chosen per "
                                "seed by a held-out check on the train split (never the eval split); C_l at the "
                                "fixed rate and at the tuned rates side by side", metavar="RATES",
                            default_doc="one rate (the training settings')")
    lr_check_items: int = setting(200, "with --lr-grid: train items each job sets aside for the check that "
                                       "chooses its rate (unless the training settings set check_items)")
    train: dict = setting({}, "training config key for every job", flag="--set")

    def validate(self) -> None:
        for key in ("models", "tasks", "algos", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"sweep key {key!r} must list at least one value")
        for key in ("seeds", "full_seeds", "extreme_seeds"):
            bad = [s for s in getattr(self, key) if isinstance(s, bool) or not isinstance(s, int)]
            if bad:
                raise ConfigError(f"sweep key {key!r}: {bad[0]!r} is not a seed; list integers, e.g. 0,1")
        bad = [r for r in self.lr_grid if isinstance(r, bool) or not _is_rate(r)]
        if bad:
            raise ConfigError(f"sweep key 'lr_grid': {bad[0]!r} is not a learning rate; list positive numbers, "
                              "e.g. 1e-4,3e-4,1e-3")
        if self.lr_check_items < 1:
            raise ConfigError("sweep key 'lr_check_items' must be at least 1")
        self.lr_grid = sorted({float(r) for r in self.lr_grid})
        if self.lr_grid and "learning_rate" in self.train:
            raise ConfigError("sweep: --lr-grid and a training learning_rate together; the grid's rates are the "
                              "rates (the fixed-rate profile is the task's default rate)")
        forbidden = {"model", "task", "algo", "seed", "layers"} & set(self.train)
        if forbidden:
            raise ConfigError(f"sweep 'train' keys {sorted(forbidden)} are swept; set them with "
                              "models/tasks/algos/seeds/layer_sets")


def _is_rate(value) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Job:
    id: str
    condition: str  # model/task/algo, the unit within which contributions are computed
    layers: str
    seed: int
    config: TrainConfig


def make_spec(values: dict) -> SweepSpec:
    """The spec of a dict of sweep keys (a YAML file, flags on top): lists may be comma-separated strings."""
    return make_config(values, SweepSpec)


def extreme_jobs(spec: SweepSpec, contributions: list[dict]) -> list[Job]:
    """The second pass of `spec.extreme_seeds`: full and the best and worst single layer of each condition
    (by contribution; `contributions` are rows of contributions.csv), once per extra seed."""
    from onelayer.models import model_num_layers

    if not spec.extreme_seeds:
        return []
    by_condition: dict[str, list[dict]] = {}
    for row in contributions:
        if str(row.get("contribution", "nan")) not in ("nan", ""):
            by_condition.setdefault(row["condition"], []).append(row)
    jobs = []
    for condition, rows in by_condition.items():
        model, task, algo = condition.split("/")
        ranked = sorted(rows, key=lambda r: float(r["contribution"]))
        layers = ["all", *dict.fromkeys([str(int(ranked[-1]["layer"])), str(int(ranked[0]["layer"]))])]
        jobs += _jobs_for(spec, model, task, algo, spec.extreme_seeds, layers, model_num_layers(model))
    return jobs


def rate_settings(spec: SweepSpec, model: str, task: str, algo: str) -> tuple[float | None, list[dict]]:
    """(the fixed rate, the training settings of each rate the jobs run at): one empty dict without a grid.

    With `spec.lr_grid`, the rates are the grid plus the fixed rate (the training settings' rate with the
    task's suggestion filled in), and every job runs a check on held-out train items that chooses its rate
    (`analysis.lr_grid`): a task that checks on its own keeps its checks (and `keep_best`); otherwise the
    only checks are at step 0 and the last step, and the last weights are kept, so only the rate is tuned.
    """
    if not spec.lr_grid:
        return None, [{}]
    from onelayer import tasks
    from onelayer.train.setup import with_task_defaults

    cfg = make_config({**spec.train, "model": model, "task": task, "algo": algo})
    cfg = with_task_defaults(cfg, tasks.make(cfg.task, **cfg.task_opts))
    check = {} if "check_items" in spec.train else {"check_items": spec.lr_check_items}
    if not cfg.check_every:
        check.update(check_every=cfg.max_steps, **({} if "keep_best" in spec.train else {"keep_best": False}))
    rates = sorted({*spec.lr_grid, cfg.learning_rate})
    return cfg.learning_rate, [{"learning_rate": r, **check} for r in rates]


def _jobs_for(spec: SweepSpec, model: str, task: str, algo: str, seeds, layer_specs, n_layers: int) -> list[Job]:
    from onelayer.models.layer_spec import describe_layers, parse_layer_spec

    _, per_rate = rate_settings(spec, model, task, algo)
    jobs = []
    for seed in seeds:
        for layers in layer_specs:
            for extra in per_rate if layers != "none" else [{}]:  # the base trains nothing: no rate
                cfg = make_config({**spec.train, **extra, "model": model, "task": task, "algo": algo, "seed": seed,
                                   "layers": layers})
                label = layers if layers in ("none", "all") else describe_layers(parse_layer_spec(layers, n_layers),
                                                                                 n_layers)
                if extra:
                    label += f"-lr{extra['learning_rate']:g}"
                job_id = f"{slug(model)}-{slug(task)}-{algo}-{slug(label)}-s{seed}-{config_hash(cfg)[:8]}"
                jobs.append(Job(job_id, f"{model}/{task}/{algo}", layers, int(seed), cfg))
    return jobs


def plan(spec: SweepSpec) -> list[Job]:
    """Every job of the sweep's first pass, in a stable order (base and full first within each condition)."""
    from onelayer.models import model_num_layers
    from onelayer.models.layer_spec import parse_layer_spec

    jobs: list[Job] = []
    for model in spec.models:
        n_layers = model_num_layers(model)
        layer_specs = ["none", "all"]
        if spec.single_layers is True:
            layer_specs += [str(i) for i in range(n_layers)]
        elif spec.single_layers:
            singles = sorted({parse_layer_spec(str(i), n_layers)[0] for i in spec.single_layers})
            layer_specs += [str(i) for i in singles]
        for extra in spec.layer_sets:
            parse_layer_spec(str(extra), n_layers)  # fail early, naming the spec and the layer count
            layer_specs.append(str(extra))
        for group in spec.pairs:
            blocks = parse_layer_spec(str(group), n_layers)
            layer_specs += [f"{i},{j}" for i, j in itertools.combinations(blocks, 2) if f"{i},{j}" not in layer_specs]
        for task in spec.tasks:
            for algo in spec.algos:
                jobs += _jobs_for(spec, model, task, algo, spec.seeds, layer_specs, n_layers)
                more_full = [s for s in spec.full_seeds if s not in spec.seeds]
                jobs += _jobs_for(spec, model, task, algo, more_full, ["all"], n_layers)
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ConfigError("the sweep lists the same job twice (duplicate layer sets or seeds)")
    return jobs
