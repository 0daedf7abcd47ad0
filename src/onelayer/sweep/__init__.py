"""Layer-contribution sweeps: plan jobs, run them on an executor, write results and contributions."""

from __future__ import annotations

import time
from pathlib import Path

from onelayer import rundir
from onelayer.io import atomic_write_json, read_json
from onelayer.sweep.plan import Job, SweepSpec, make_spec, plan
from onelayer.sweep.store import job_dir, write_results

EXECUTORS = ("local", "processes", "ray")


def prepare(jobs: list[Job], log=print) -> None:
    """Build any warm-start checkpoints once, before workers fan out."""
    from onelayer import tasks
    from onelayer.models import BUILTIN_MODELS
    from onelayer.train.setup import completion_budget
    from onelayer.train.warmstart import warm_started

    seen = set()
    for job in jobs:
        cfg = job.config
        key = (cfg.model, cfg.task, repr(sorted(cfg.task_opts.items())))
        if cfg.model in BUILTIN_MODELS and cfg.warm_start and key not in seen:
            seen.add(key)
            task = tasks.make(cfg.task, **cfg.task_opts)
            warm_started(cfg.model, task, max_new_tokens=completion_budget(cfg, task), log=log)


def run_sweep(spec: SweepSpec, out: str | Path, *, executor: str = "local", workers: int = 1,
              retry_failed: bool = False, log=print, progress: bool = True, address: str | None = None,
              num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2, procs_per_job: int = 1) -> list[dict]:
    out = Path(out)
    jobs = plan(spec)
    atomic_write_json(out / "plan.json", {"spec": spec.__dict__, "jobs": [{"id": j.id, "condition": j.condition,
                                          "layers": j.layers, "seed": j.seed, "learning_rate": j.config.learning_rate}
                                          for j in jobs]})
    start = time.monotonic()
    run = dict(executor=executor, workers=workers, retry_failed=retry_failed, log=log, progress=progress,
               address=address, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, procs_per_job=procs_per_job)
    _run_jobs(jobs, out, **run)
    if spec.extreme_seeds:  # second pass: full and the best and worst layer with more seeds
        from onelayer.analysis.summary import summarize
        from onelayer.sweep.plan import extreme_jobs

        write_results(out, jobs)
        summarize(out)
        more = [j for j in extreme_jobs(spec, _read_csv(out / "contributions.csv")) if j.id not in {k.id for k in jobs}]
        log(f"sweep: second pass, seeds {spec.extreme_seeds} for " + ", ".join(sorted({j.layers for j in more})))
        jobs = jobs + more
        _run_jobs(more, out, jobs_so_far=jobs, **run)
    rows = write_results(out, jobs)
    from onelayer.analysis.summary import summarize

    for condition, info in summarize(out).items():
        if "full_gain" in info:
            g, c = info["full_gain"], info["concentration"]
            log(f"{condition}: full-RL gain {g['gain']:+.1%} [{g['ci_low']:+.1%}, {g['ci_high']:+.1%}]"
                + (" (NOISE: CI includes 0)" if g["noise"] else "")
                + f" ({_seed_coverage(g['n_seeds'], info.get('layer_seeds', 0))})"
                + (f"; best layer {c['best_layer']} recovers {c['best_recovery']:.0%}; "
                   f"{c['n_layers_ge_0_8']} layers with C >= 0.8; top-3 share {c['top3_share']:.0%}" if c else ""))
            for ws in info.get("warm_starts", []):
                log(f"{condition}: warm start {ws['hash']} (held-out {ws['heldout_accuracy']:.1%}) for {ws['jobs']} jobs"
                    + ("  <- SEVERAL warm starts in one condition" if len(info["warm_starts"]) > 1 else ""))
            if info.get("lr_grid"):
                grid = info["lr_grid"]
                log(f"{condition}: learning-rate grid: {grid.get('summary') or grid.get('error')}")
            if info.get("additivity"):
                log(f"{condition}: additivity: {info['additivity']['summary']}")
            if info.get("collapsed_jobs"):
                log(f"{condition}: COLLAPSED (training reward fell apart; contributions from them are marked): "
                    + ", ".join(info["collapsed_jobs"]))
    log(summary_table(rows, out))
    from onelayer.analysis.report import build_report

    log(f"report: {build_report(out)}")
    log(f"sweep: finished in {time.monotonic() - start:.0f}s; results in {out / 'results.csv'}")
    return rows


def _seed_coverage(full_seeds: int, layer_seeds: int) -> str:
    """What the condition's CIs cover, in words, given how many seeds the full and single-layer runs have."""
    if full_seeds <= 1:
        return "1 seed: CIs cover eval items only, not seed-to-seed variation; add --seeds 0,1"
    if layer_seeds == 1:
        return (f"full and base on {full_seeds} seeds: the gain CI and the denominator of every C_l cover seed "
                "variation; single-layer runs have 1 seed, so a C_l CI covers eval items for its numerator")
    return f"{full_seeds} seeds: CIs cover items and seeds"


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _run_jobs(jobs: list[Job], out: Path, *, executor, workers, retry_failed, log, progress, address, num_cpus,
              num_gpus, max_retries, procs_per_job: int = 1, jobs_so_far: list[Job] | None = None) -> None:
    """Run the jobs of `jobs` that are not done on the executor, keeping results.csv current."""
    from tqdm.auto import tqdm

    from onelayer.sweep.executors import run_local, run_processes

    table = jobs_so_far or jobs
    statuses = {j.id: rundir.status(job_dir(out, j.id)) for j in jobs}
    # Unfinished and failed jobs resume from their last checkpoint; --retry-failed restarts failed ones afresh.
    todo = [j for j in jobs if statuses[j.id] != "done"]
    failed = [j for j in todo if statuses[j.id] == "failed"]
    if retry_failed:
        for job in failed:
            rundir.reset(job_dir(out, job.id))
    log(f"sweep: {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run"
        + (f" ({len(failed)} failed before: "
           f"{'restarted from scratch' if retry_failed else 'resumed from their checkpoint'})" if failed else ""))
    prepare(todo, log=log)
    bar = tqdm(total=len(todo), desc="sweep", unit="job", disable=not progress, dynamic_ncols=True)

    def on_done(job_id: str, status: str) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{job_id}: {status}")
        write_results(out, table)  # keep results.csv current, so a killed sweep still leaves a table

    if executor == "local":
        run_local(todo, str(out), on_done)
    elif executor == "processes":
        run_processes(todo, str(out), on_done, workers)
    elif executor == "ray":
        from onelayer.sweep.ray_executor import run_ray

        run_ray(todo, str(out), on_done, address=address, num_cpus=num_cpus, num_gpus=num_gpus, procs=procs_per_job,
                max_retries=max_retries, log=log)
    bar.close()


def summary_table(rows: list[dict], out: Path) -> str:
    """A plain-text table of every job: score, gain with CI, and layer contribution where there is one."""
    import csv

    contrib = {}
    if (out / "contributions.csv").is_file():
        with open(out / "contributions.csv") as fh:
            contrib = {(r["condition"], r["layer"]): r for r in csv.DictReader(fh)}
    summary = read_json(out / "summary.json") if (out / "summary.json").is_file() else {}
    # the fixed rate of a --lr-grid condition, as the summary found it
    fixed = {c: v["lr_grid"]["fixed"] for c, v in summary.items() if "fixed" in (v.get("lr_grid") or {})}
    rates = len({r.get("learning_rate") for r in rows if r["layers"] != "none"}) > 1
    lines = [f"{'condition':<28} {'seed':>4} {'layers':<10} {'status':<8} {'score':>6} {'gain [95% CI]':<24} {'C [95% CI]':<22}"]
    if rates:
        lines[0] = lines[0].replace(f"{'layers':<10}", f"{'layers':<10} {'lr':<8}")
    for r in rows:
        label = f"{r['layers']:<10}" + (f" {r['learning_rate'] if r['layers'] != 'none' else '':<8}" if rates else "")
        if r["status"] != "done":
            lines.append(f"{r['condition']:<28} {r['seed']:>4} {label} {r['status']:<8}")
            continue
        gain = (f"{r['gain']:+.3f} [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}]"
                + (" COLLAPSED" if r.get("collapsed") else ""))
        at_fixed = not rates or r.get("learning_rate") == fixed.get(r["condition"])
        c = contrib.get((r["condition"], r["layers"])) if at_fixed else None
        cstr = f"{float(c['contribution']):.2f} [{float(c['ci_low']):.2f}, {float(c['ci_high']):.2f}]" if c else ""
        lines.append(f"{r['condition']:<28} {r['seed']:>4} {label} {r['status']:<8} "
                     f"{r['score']:>6.3f} {gain:<24} {cstr:<22}")
    return "\n".join(lines)


__all__ = ["EXECUTORS", "Job", "SweepSpec", "make_spec", "plan", "run_sweep"]
