"""`onelayer ensemble`: a majority vote over a sweep's top-k single-layer models, against full RL and against
full RL's own k-sample self-consistency vote.

From a finished sweep (one condition: model/task/algo), the k single-layer jobs with the highest contribution
in `contributions.csv` (ties: the lower layer; each on the sweep's first seed) vote on every eval item with
their greedy answers (`Task.answer`, kept in each job's `eval.json` as `item_answers`); the rules of the vote
are in `onelayer.analysis.ensemble`. It is compared with

- full RL: the sweep's `layers == "all"` jobs' greedy scores, each seed and their mean;
- full RL's self-consistency vote, which spends the same k generations per item: each full job's model
  samples completions at its training temperature and top-p from a generator seeded with `seed`, and its
  first k samples vote (ties: the one sampled first). The samples are drawn once, max(k) per item;
- context: each voter's own score, the best single layer (rank 1), and the oracle (an item counts when any
  of the k voters solved it).

A job run before answers were kept has none in its `eval.json`: its greedy answers are recomputed from its
saved `model/`, and the recomputed scores' agreement with the stored `item_scores` (share of items) is
reported; the vote uses the recomputed scores, which go with those answers. Recomputed answers and the
self-consistency samples are cached in the job's directory (`answers.json`, keyed by its `eval.json`), so
a second run reads them. Output: `OUT/ensemble.csv` (one row per k and method) and `OUT/ensemble.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from onelayer import rundir
from onelayer.config import REQUIRED, ConfigError, TrainConfig, make_config, setting
from onelayer.io import atomic_write_json, read_json
from onelayer.sweep.store import sweep_condition

ANSWERS_FILE = "answers.json"


@dataclass
class EnsembleSpec:
    """What `onelayer ensemble` votes and compares (its flags are generated from these fields)."""

    source: str = setting(REQUIRED, "the finished sweep directory: contributions.csv ranks its single-layer jobs",
                          flag="--from")
    top: list = setting([3, 5, 7], "ensemble sizes k: each votes with the k single-layer models of highest "
                                   "contribution, against full RL's own k-sample self-consistency vote")
    condition: str | None = setting(None, "the sweep condition (model/task/algo) to use",
                                    default_doc="the sweep's only condition")
    out: str | None = setting(None, "output directory (ensemble.csv, ensemble.json)", default_doc="FROM/ensemble")
    seed: int = setting(0, "seed of the generator that draws full RL's self-consistency samples")
    layer_seed: int | None = setting(None, "seed of the single-layer models that vote",
                                     default_doc="the sweep's first seed")
    batch_size: int = setting(256, "sequences per generation batch")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    threads: int | None = setting(None, "torch CPU threads", default_doc="torch's choice")

    def validate(self) -> None:
        if not self.top or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.top):
            raise ConfigError(f"ensemble: --top {self.top!r} must list positive integers, e.g. 3,5,7")
        if self.batch_size < 1:
            raise ConfigError(f"ensemble: --batch-size {self.batch_size} must be at least 1")


@dataclass
class Voter:
    """A job's greedy per-item scores and answers (the ones that go together)."""

    job_id: str
    path: Path
    eval: dict
    scores: list | None = None
    answers: list | None = None
    answers_from: str = "eval.json"  # or "recomputed from model/"
    agreement: float | None = None  # recomputed: share of items whose score equals the stored one


# ------------------------------------------------------------------------------------ the sweep's jobs


def ranked_layers(contributions: Path, condition: str) -> list[tuple[int, float]]:
    """(layer, contribution) of `condition`'s rows, highest first (ties: the lower layer; NaN rows skipped)."""
    with open(contributions, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("condition", condition) == condition]
    ranked = []
    for r in rows:
        try:
            layer, value = int(float(r["layer"])), float(r["contribution"])
        except (KeyError, ValueError):
            continue
        if not math.isnan(value):
            ranked.append((layer, value))
    return sorted(ranked, key=lambda lv: (-lv[1], lv[0]))


def finished_jobs(src: Path, plan: dict, condition: str) -> list[Voter]:
    """The condition's finished jobs, in plan order."""
    out = []
    for job in plan["jobs"]:
        path = src / "jobs" / job["id"]
        if job["condition"] == condition and rundir.is_done(path):
            out.append(Voter(job["id"], path, read_json(path / "eval.json")))
    return out


def _job_config(job: Voter, spec: EnsembleSpec) -> TrainConfig:
    """The job's training config (config.json), pointed at its saved model."""
    saved = read_json(job.path / "config.json")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in fields}
    values.update(model=str(job.path / "model"), device=spec.device, threads=spec.threads, progress=False)
    return make_config(values)


def _check_agent(job: Voter) -> None:
    from onelayer import tasks
    from onelayer.tasks.agent import is_agent

    saved = read_json(job.path / "config.json")
    if is_agent(tasks.make(saved["task"], **saved.get("task_opts", {}))):
        raise ConfigError(f"ensemble: {saved['task']} is an agent task; its episodes have no single answer to vote "
                          "on (majority votes need a single-turn task)")


# ------------------------------------------------------------------------------ answers and samples


def _load_model(job: Voter, spec: EnsembleSpec, why: str, log):
    """(model, tok, task, eval items, cfg, precision) of the job's saved model/, or a ConfigError saying how to
    get one."""
    from onelayer.train.eval_cmd import prepare_eval

    if not (job.path / "model" / "config.json").is_file():
        raise ConfigError(f"ensemble: job {job.job_id} has no model/ to {why}; rerun the sweep with save_model "
                          "(the default; --set save_model=true)")
    model, tok, task, cfg, precision, _ = prepare_eval(_job_config(job, spec), log=lambda *_: None)
    items = task.items("eval")
    if [it["id"] for it in items] != job.eval["item_ids"]:
        raise ConfigError(f"ensemble: job {job.job_id}'s task no longer gives the eval items its eval.json scored")
    log(f"ensemble: {job.job_id}: {why}")
    return model, tok, task, items, cfg, precision


def _fingerprint(job: Voter) -> str:
    return hashlib.sha256((job.path / "eval.json").read_bytes()).hexdigest()[:16]


def _cache(job: Voter) -> dict:
    """The job's answers.json, if it was written for this eval.json."""
    path = job.path / ANSWERS_FILE
    saved = read_json(path) if path.is_file() else {}
    return saved if saved.get("eval_json") == _fingerprint(job) else {}


def _store(job: Voter, key: str, value: dict, log) -> None:
    try:
        atomic_write_json(job.path / ANSWERS_FILE, {**_cache(job), "eval_json": _fingerprint(job), key: value})
    except OSError as exc:
        log(f"ensemble: could not cache {key} answers in {job.path} ({exc}); the next run recomputes them")


def greedy_answers_of(job: Voter, spec: EnsembleSpec, log=print) -> Voter:
    """`job` with its greedy scores and answers: from eval.json, the cache, or recomputed from model/."""
    from onelayer.train.evaluate import greedy_answers

    if job.eval.get("item_answers") is not None:
        job.scores, job.answers = job.eval["item_scores"], job.eval["item_answers"]
        return job
    greedy = _cache(job).get("greedy")
    if greedy is None:
        model, tok, task, items, cfg, precision = _load_model(job, spec, "recompute its greedy answers (its eval.json "
                                                              "predates item_answers)", log)
        with precision.autocast():
            scores, answers = greedy_answers(model, tok, task, items, max_new_tokens=cfg.max_completion_length,
                                             batch_size=spec.batch_size)
        stored = job.eval["item_scores"]
        greedy = {"item_scores": scores, "item_answers": answers,
                  "agreement": sum(a == b for a, b in zip(scores, stored)) / len(stored)}
        _store(job, "greedy", greedy, log)
    job.scores, job.answers = greedy["item_scores"], greedy["item_answers"]
    job.answers_from, job.agreement = "recomputed from model/", greedy["agreement"]
    return job


def samples_of(job: Voter, n: int, spec: EnsembleSpec, log=print) -> dict:
    """At least n sampled completions' scores and answers per eval item ([items][samples], `n`: how many were
    drawn) of the job's model, at its training temperature and top-p; from the cache when it holds n or more of
    the same draw (a vote of k uses the first k)."""
    from onelayer.train.evaluate import sampled_answers

    want = {"seed": spec.seed, **{k: read_json(job.path / "config.json")[k] for k in ("temperature", "top_p")}}
    cached = _cache(job).get("samples")
    if cached is not None and cached["n"] >= n and all(cached[k] == v for k, v in want.items()):
        return cached
    model, tok, task, items, cfg, precision = _load_model(job, spec, f"sample {n} completions per item", log)
    with precision.autocast():
        scores, answers = sampled_answers(model, tok, task, items, n=n, max_new_tokens=cfg.max_completion_length,
                                          temperature=cfg.temperature, top_p=cfg.top_p, seed=spec.seed,
                                          batch_size=spec.batch_size)
    samples = {**want, "n": n, "item_scores": scores, "item_answers": answers}
    _store(job, "samples", samples, log)
    return samples


# ---------------------------------------------------------------------------------------------- run


def run_ensemble(spec: EnsembleSpec, log=print) -> list[dict]:
    """Vote, compare and write OUT/ensemble.csv and OUT/ensemble.json (OUT: --out, default FROM/ensemble);
    returns the table's rows."""
    import torch

    from onelayer.analysis.contribution import run_kind
    from onelayer.analysis.ensemble import ensemble_rows, format_ensemble, self_consistency_scores, write_ensemble

    started = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    contributions, condition, plan = sweep_condition(spec.source, spec.condition, "ensemble --from")
    src, ks = Path(spec.source), sorted(set(spec.top))
    out = Path(spec.out) if spec.out else src / "ensemble"
    jobs = finished_jobs(src, plan, condition)
    if not jobs:
        raise ConfigError(f"ensemble: no finished jobs of {condition} in {str(src)!r}")
    _check_agent(jobs[0])
    layer_seed = plan["spec"]["seeds"][0] if spec.layer_seed is None else spec.layer_seed
    singles: dict[int, Voter] = {}
    for job in jobs:
        kind, layer = run_kind(job.eval)
        if kind == "layer" and job.eval.get("seed") == layer_seed:
            singles.setdefault(layer, job)
    full = sorted((j for j in jobs if run_kind(j.eval)[0] == "full"), key=lambda j: j.eval["seed"])
    if not full:
        raise ConfigError(f"ensemble: no finished full-parameter job (layers all) of {condition} to compare with")
    ranking = [(layer, c) for layer, c in ranked_layers(contributions, condition) if layer in singles]
    if not ranking:
        raise ConfigError(f"ensemble: contributions.csv ranks no finished single-layer job of {condition} on seed "
                          f"{layer_seed} (contributions are NaN when full RL gained nothing over the base; or "
                          "--layer-seed names a seed without single-layer runs)")
    if ks[-1] > len(ranking):
        raise ConfigError(f"ensemble: --top {ks[-1]} is more than the {len(ranking)} ranked single-layer jobs of "
                          f"{condition} (seed {layer_seed}); choose k <= {len(ranking)}")
    item_ids = full[0].eval["item_ids"]
    chosen = [singles[layer] for layer, _ in ranking[:ks[-1]]]
    for job in chosen + full:
        if job.eval["item_ids"] != item_ids:
            raise ConfigError(f"ensemble: job {job.job_id} was scored on other eval items than {full[0].job_id}")
    voters = [greedy_answers_of(job, spec, log) for job in chosen]
    for v in voters:
        if v.agreement is not None:
            log(f"ensemble: {v.job_id}: recomputed greedy scores agree with eval.json on {v.agreement:.1%} of items")
    samples = [samples_of(j, ks[-1], spec, log) for j in full]
    full_seeds = [j.eval["seed"] for j in full]

    rows, per_k = [], {}
    full_scores = {j.eval["seed"]: j.eval["item_scores"] for j in full}
    for k in ks:
        top = voters[:k]
        sc = {seed: self_consistency_scores(sm["item_answers"], sm["item_scores"], k) for seed, sm in zip(full_seeds, samples)}
        k_rows, per_k[str(k)] = ensemble_rows(k, [run_kind(v.eval)[1] for v in top], layer_seed, [v.answers for v in top],
                                              [v.scores for v in top], full_scores, sc)
        rows += k_rows
    record = {
        "source": str(src), "condition": condition, "ks": ks, "layer_seed": layer_seed, "full_seeds": full_seeds,
        "full_jobs": [j.job_id for j in full], "n_items": len(item_ids),
        "ranking": [{"layer": layer, "contribution": c, "job": v.job_id, "stored_score": v.eval["score"],
                     "score": sum(v.scores) / len(v.scores), "answers_from": v.answers_from, "agreement": v.agreement}
                    for (layer, c), v in zip(ranking, voters)],
        "self_consistency": {k: samples[0][k] for k in ("seed", "temperature", "top_p")}
        | {"samples_drawn": samples[0]["n"], "vote_of_k": "the first k samples of each item"},
        "per_k": per_k, "threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - started, 2),
    }
    write_ensemble(out, rows, record)
    log(format_ensemble(rows))
    log(f"ensemble: {out / 'ensemble.csv'} ({condition}; layer models on seed {layer_seed}, full RL on seeds "
        f"{', '.join(map(str, full_seeds))}; {record['wall_seconds']:.0f}s)")
    return rows
