"""Executors: run a list of jobs locally in sequence or in N worker processes.

Every executor calls the same `execute_job`, which runs `onelayer.train.run` into the job's directory
and records a failure (error.txt, status failed) instead of stopping the sweep. Because `train.run`
resumes from its checkpoint and skips finished runs, rerunning a sweep never repeats finished work.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import traceback
from pathlib import Path

from onelayer import rundir
from onelayer.io import atomic_write_json, atomic_write_text
from onelayer.sweep.store import job_dir


def execute_job(job, out: str, threads: int | None = None, show_steps: bool = False, nproc: int = 1) -> tuple[str, str]:
    """Run one job (`nproc` > 1: over that many processes, started with torchrun); returns (job id, final
    status). Never raises for a failing job."""
    from onelayer.train import run

    path = job_dir(Path(out), job.id)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(job.config, progress=show_steps, threads=job.config.threads or threads)
    try:
        if nproc > 1:
            _run_processes(dataclasses.replace(cfg, nproc=nproc), path)
        else:
            run(cfg, path, log=lambda msg: None)
        (path / "error.txt").unlink(missing_ok=True)
        return job.id, "done"
    except Exception as exc:  # recorded per job: one bad job must not sink the sweep
        atomic_write_text(path / "error.txt", traceback.format_exc() + f"\n{type(exc).__name__}: {exc}\n")
        atomic_write_json(path / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return job.id, "failed"


def _run_processes(cfg, path: Path) -> None:
    """`onelayer train --config JOB.yaml --nproc N` into the job's directory (the job's config, as YAML)."""
    import yaml

    from onelayer.train.distributed import launch

    atomic_write_text(path / "job.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    code = launch(["train", "--config", str(path / "job.yaml"), "--out", str(path)], cfg.nproc)
    if code != 0:
        raise RuntimeError(f"the job's {cfg.nproc} processes (torchrun) exited with status {code}")


def run_local(jobs, out: str, on_done) -> None:
    for job in jobs:
        on_done(*execute_job(job, out, show_steps=True))  # the job's step bar sits under the sweep bar


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_processes(jobs, out: str, on_done, workers: int) -> None:
    """N spawn-started worker processes; CPU threads are split so workers do not oversubscribe cores."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(execute_job, job, out, threads): job for job in jobs}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                on_done(*fut.result())
            except cf.process.BrokenProcessPool as exc:  # a worker died (e.g. killed): record, move on
                atomic_write_text(job_dir(Path(out), job.id) / "error.txt", f"worker process died: {exc}\n")
                on_done(job.id, rundir.status(job_dir(Path(out), job.id)))
