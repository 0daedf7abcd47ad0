"""Ray executor: every job is a Ray task with declared resources, retried a bounded number of times.

Two kinds of failure are retried, each at most `max_retries` times:
- the worker running a job dies (node lost, OOM-killed): Ray itself resubmits the task (`max_retries`);
- the job ran and came back "failed" (its error.txt is written by `execute_job`): the job is resubmitted
  here, and because `train.run` resumes from the job's last checkpoint, a retry continues where it stopped.
Every attempt is recorded in the job's `attempts.json`. A task that Ray gives up on (a `RayError`) is
recorded as failed (error.txt, status.json) and the sweep goes on with the other jobs.

The sweep directory must be on a filesystem every Ray node can see: workers write the job directories,
the driver reads them back for results.csv.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from onelayer.config import ConfigError
from onelayer.io import atomic_write_json, atomic_write_text, read_json
from onelayer.sweep.store import job_dir


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("the ray executor needs Ray, an optional extra: pip install 'onelayer[ray]'") from exc
    return ray


def _ray_execute_job(job, out: str, threads: int, procs: int = 1) -> tuple[str, str]:
    from onelayer.sweep.executors import execute_job

    return execute_job(job, out, threads=threads, nproc=procs)


def _record_attempt(out: str, job_id: str, attempt: int, status: str, error: str | None = None) -> None:
    path = job_dir(Path(out), job_id)
    path.mkdir(parents=True, exist_ok=True)
    file = path / "attempts.json"
    try:
        attempts = read_json(file) if file.is_file() else []
    except Exception:  # noqa: BLE001 - a damaged log must not stop the sweep; start it afresh
        attempts = []
    entry = {"attempt": attempt, "status": status, "executor": "ray", "time": time.time()}
    if error:
        entry["error"] = error
    atomic_write_json(file, [*attempts, entry])


def _record_ray_failure(out: str, job_id: str, exc: BaseException) -> None:
    path = job_dir(Path(out), job_id)
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    atomic_write_text(path / "error.txt", f"Ray task failed: {text}\n{type(exc).__name__}: {exc}\n")
    atomic_write_json(path / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})


def run_ray(jobs, out: str, on_done, *, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
            max_retries: int = 2, procs: int = 1, log=print) -> None:
    """Run `jobs` as Ray tasks; `on_done(job_id, status)` is called once per job as it finishes for good.

    address: None starts (or reuses) a local Ray; "auto" or "HOST:PORT" joins a running cluster.
    num_cpus / num_gpus: resources each task declares; a job uses int(num_cpus) torch threads.
    procs: processes per job (torchrun inside the task, `train.distributed`), sharing the task's CPUs and GPUs.
    max_retries: how often a crashed worker is retried by Ray, and how often a failed job is resubmitted.
    """
    ray = _import_ray()
    if num_cpus <= 0 or num_gpus < 0 or max_retries < 0:
        raise ConfigError(f"ray executor: need num_cpus > 0, num_gpus >= 0, max_retries >= 0 "
                          f"(got {num_cpus}, {num_gpus}, {max_retries})")
    jobs = list(jobs)
    if not jobs:
        return
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
        started_here = address is None
    try:
        have = ray.cluster_resources()
        if have.get("CPU", 0) < num_cpus or have.get("GPU", 0) < num_gpus:
            log(f"ray: each job asks for {num_cpus} CPU / {num_gpus} GPU but the cluster has "
                f"{have.get('CPU', 0)} CPU / {have.get('GPU', 0)} GPU now; jobs wait until such a node joins")
        threads = max(1, int(num_cpus) // procs)  # per process of a job
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(_ray_execute_job)
        pending: dict = {}
        attempt_of: dict[str, int] = {}

        def submit(job) -> None:
            attempt_of[job.id] = attempt_of.get(job.id, 0) + 1
            pending[task.remote(job, out, threads, procs)] = job

        for job in jobs:
            submit(job)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                attempt = attempt_of[job.id]
                try:
                    job_id, status = ray.get(ref)
                except ray.exceptions.RayError as exc:  # Ray gave up (after its own max_retries): record it
                    _record_ray_failure(out, job.id, exc)
                    _record_attempt(out, job.id, attempt, "failed", f"{type(exc).__name__}: {str(exc)[:500]}")
                    on_done(job.id, "failed")
                    continue
                error = None
                if status == "failed":
                    status_file = job_dir(Path(out), job.id) / "status.json"
                    error = read_json(status_file).get("error") if status_file.is_file() else None
                _record_attempt(out, job_id, attempt, status, error)
                if status == "failed" and attempt <= max_retries:
                    log(f"ray: job {job_id} failed (attempt {attempt} of {max_retries + 1}); resubmitting")
                    submit(job)
                else:
                    on_done(job_id, status)
    finally:
        if started_here:
            ray.shutdown()
