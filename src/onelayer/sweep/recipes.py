"""`onelayer recipes`: layer-aware training recipes built from a sweep's contributions, run as one sweep.

From a finished sweep's `contributions.csv` (one condition: model/task/algo), the recipes are

- `full`: every layer (full-parameter RL), the reference every Δ is taken against;
- `only-B{k}`: only the k layers with the highest contribution;
- `boost-B{k}`: all layers, the top k at twice the learning rate (`--layer-lr top:k@FILE=2`);
- `mid-{k}`: the k middle layers, by position only (no profile);
- `worst-{k}`: the k layers with the lowest contribution (a control);
- `random-{k}-d{d}`: k layers drawn at random with seed d (a control; several draws).

Each recipe's layer set is resolved to explicit block indices when the recipes are planned, so a job's
config (and its id) does not depend on the file it was ranked from later. Jobs run through the sweep's
store and executors (resumable; a job whose id is already done in the source sweep is copied, not rerun),
and `recipes.csv` gets one row per recipe (`analysis.recipes`).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from onelayer.config import REQUIRED, ConfigError, make_config, setting
from onelayer.io import read_json, slug
from onelayer.rundir import config_hash
from onelayer.sweep.plan import Job
from onelayer.sweep.store import sweep_condition


@dataclass
class RecipesSpec:
    """Which recipes to run from a sweep (`onelayer recipes`' flags are generated from these fields)."""

    source: str = setting(REQUIRED, "the finished sweep directory whose contributions.csv ranks the layers",
                          flag="--from")
    ks: list = setting([1, 3], "layer counts k of the Only-Bk, Boost-Bk, Mid-k, worst-k and random-k recipes",
                       flag="--k")
    seeds: list = setting([0, 1, 2], "seeds; each recipe runs once per seed")
    draws: int = setting(2, "random-k draws per k (seeds of the layer draw: 0, 1, ...)")
    boost: float = setting(2.0, "Boost-Bk: the learning-rate multiplier of the top k layers")
    condition: str | None = setting(None, "the sweep condition (model/task/algo) to use",
                                    default_doc="the sweep's only condition")
    train: dict = setting({}, "training config key over the source sweep's, for every recipe job (e.g. threads=1); "
                              "with any, no job is copied from the source sweep", flag="--set")

    def validate(self) -> None:
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ConfigError(f"recipes: --k {self.ks!r} must list positive integers, e.g. 1,3,5")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"recipes: --seeds {self.seeds!r} must list integers, e.g. 0,1,2")
        swept = {"model", "task", "algo", "seed", "layers", "layer_lr"} & set(self.train)
        if swept:
            raise ConfigError(f"recipes: --set {sorted(swept)[0]} is what the recipes choose; set other training keys")
        if self.draws < 0 or not self.boost > 0:
            raise ConfigError("recipes: --draws must be >= 0 and --boost > 0")


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # full, only, boost, mid, worst, random
    k: int | None
    layers: str  # explicit block indices (or "all")
    layer_lr: dict  # block spec -> multiplier


def source_condition(spec: RecipesSpec) -> tuple[Path, str, dict, int]:
    """(contributions file, condition, the source sweep's training settings, layer count), or a ConfigError
    saying what is missing."""
    from onelayer.models import model_num_layers

    contributions, condition, plan = sweep_condition(spec.source, spec.condition, "recipes --from")
    return contributions, condition, dict(plan["spec"].get("train") or {}), model_num_layers(condition.split("/")[0])


def recipes(spec: RecipesSpec, contributions: Path, num_layers: int) -> list[Recipe]:
    """Every recipe of `spec`, with its layer set resolved to block indices."""
    from onelayer.models.layer_spec import parse_layer_spec

    def blocks(layer_spec: str) -> str:
        return ",".join(map(str, parse_layer_spec(layer_spec, num_layers)))

    out = [Recipe("full", "full", None, "all", {})]
    for k in spec.ks:
        top = blocks(f"top:{k}@{contributions}")
        out += [Recipe(f"only-B{k}", "only", k, top, {}),
                Recipe(f"boost-B{k}", "boost", k, "all", {top: spec.boost}),
                Recipe(f"mid-{k}", "mid", k, blocks(f"middle:{k}"), {}),
                Recipe(f"worst-{k}", "worst", k, blocks(f"bottom:{k}@{contributions}"), {})]
        out += [Recipe(f"random-{k}-d{d}", "random", k, blocks(f"random:{k}@{d}"), {}) for d in range(spec.draws)]
    return out


def recipe_jobs(seeds: list, condition: str, train: dict, recipes_: list[Recipe]) -> tuple[list[Job], dict]:
    """One job per recipe and seed, on the source sweep's training settings; and job id -> recipe name (two
    recipes that resolve to the same blocks, e.g. a random draw equal to the top k, keep their own jobs)."""
    model, task, algo = condition.split("/")
    jobs, names = [], {}
    for recipe in recipes_:
        for seed in seeds:
            cfg = make_config({**train, "model": model, "task": task, "algo": algo, "seed": seed,
                               "layers": recipe.layers, "layer_lr": recipe.layer_lr})
            job_id = f"{slug(model)}-{slug(task)}-{algo}-{recipe.name}-s{seed}-{config_hash(cfg)[:8]}"
            jobs.append(Job(job_id, condition, recipe.layers, int(seed), cfg))
            names[job_id] = recipe.name
    return jobs, names


def reuse_finished(jobs: list[Job], sources: list[Path], out: Path, log=print, nproc: int = 1) -> int:
    """Copy jobs another store already finished with the same config (the job id ends in its config hash)
    into the recipe store, instead of rerunning them. `nproc`: the processes each job runs on here (a job's
    config hash counts them when more than one, so a run on another count is not the same job)."""
    from onelayer import rundir

    copied = 0
    for job in jobs:
        want = out / "jobs" / job.id
        if want.exists():
            continue
        suffix = job.id.rsplit("-", 1)[-1]
        have = next((d for src in sources for d in sorted((Path(src) / "jobs").glob(f"*-s{job.seed}-{suffix}"))
                     if rundir.is_done(d) and _same_config(d, job, nproc)), None)
        if have is not None:
            shutil.copytree(have, want, ignore=shutil.ignore_patterns("checkpoint", "best", "model"))
            copied += 1
    if copied:
        log(f"recipes: {copied} job(s) already done in {', '.join(map(str, sources))}, copied")
    return copied


def _same_config(path: Path, job: Job, nproc: int = 1) -> bool:
    want = config_hash(dataclasses.replace(job.config, nproc=nproc))
    return (path / "config.json").is_file() and read_json(path / "config.json").get("config_hash") == want


def run_recipe_jobs(recipes_: list[Recipe], seeds: list, condition: str, train: dict, out: Path, run,
                    sources: list[Path], meta: dict, log=print) -> list[dict]:
    """Run `recipes_` (full first) on `seeds` as one resumable sweep under `out` (`run`: a `config.SweepConfig`
    for the executor; finished jobs of `sources` are copied) and write out/recipes.csv; returns its rows."""
    from onelayer.analysis.recipes import recipes_table
    from onelayer.io import atomic_write_json
    from onelayer.sweep import _run_jobs
    from onelayer.sweep.store import write_results

    jobs, names = recipe_jobs(seeds, condition, train, recipes_)
    atomic_write_json(out / "plan.json", {
        "spec": {**meta, "condition": condition, "train": train},
        "recipes": [r.__dict__ for r in recipes_],
        "jobs": [{"id": j.id, "condition": j.condition, "layers": j.layers, "seed": j.seed,
                  "recipe": names[j.id]} for j in jobs]})
    reuse_finished(jobs, sources, out, log, nproc=run.procs_per_job)
    _run_jobs(jobs, out, executor=run.executor, workers=run.workers, retry_failed=run.retry_failed, log=log,
              progress=True, address=run.address, num_cpus=run.num_cpus_per_job, num_gpus=run.num_gpus_per_job,
              max_retries=run.max_retries, procs_per_job=run.procs_per_job)
    write_results(out, jobs)
    return recipes_table(out, recipes_, names)


def run_recipes(spec: RecipesSpec, run, out: str | Path | None = None, log=print) -> list[dict]:
    """Plan, run (`run`: a `config.SweepConfig` for the executor) and tabulate the recipes under `out`
    (default: FROM/recipes)."""
    from onelayer.analysis.recipes import format_recipes
    from onelayer.analysis.report import build_report

    contributions, condition, train, num_layers = source_condition(spec)
    out = Path(out or Path(spec.source) / "recipes")
    recipes_ = recipes(spec, contributions, num_layers)
    # an override may be resume-free (threads: the same config hash), so the source's jobs are not reused
    rows = run_recipe_jobs(recipes_, spec.seeds, condition, {**train, **spec.train}, out, run,
                           [] if spec.train else [Path(spec.source)], {"recipes_from": str(spec.source)}, log)
    log(format_recipes(rows))
    log(f"recipes: {out / 'recipes.csv'}; report: {build_report(out)}")
    return rows
