"""Ray executor: on a local Ray (num_cpus=2) it gives the same results.csv scores as the local executor."""

import dataclasses
import json
import os
import sys

import pytest

ray = pytest.importorskip("ray")

from onelayer.cli import main  # noqa: E402
from onelayer.sweep import make_spec, plan  # noqa: E402
from test_sweep import read_csv, sweep_args  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(onelayer_cache):
    # Workers inherit this environment: they find onelayer (src layout) and the same warm-start cache.
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_matches_local(base_dir, local_ray, tmp_path):
    common = ["--set", "max_steps=3", "--set", "threads=1"]
    assert main(sweep_args(tmp_path / "a", *common)) == 0
    assert main(sweep_args(tmp_path / "b", *common, "--executor", "ray", "--max-retries", "1")) == 0
    a, b = read_csv(tmp_path / "a" / "results.csv"), read_csv(tmp_path / "b" / "results.csv")
    assert len(a) == 3 and all(r["status"] == "done" for r in b)
    assert [(r["job_id"], r["score"]) for r in a] == [(r["job_id"], r["score"]) for r in b]
    for r in b:  # each job ran once, and the attempt is recorded
        attempts = json.loads((tmp_path / "b" / "jobs" / r["job_id"] / "attempts.json").read_text())
        assert [(x["attempt"], x["status"]) for x in attempts] == [(1, "done")]


@pytest.mark.slow
def test_failed_job_is_retried_then_recorded(local_ray, tmp_path):
    from onelayer.sweep.ray_executor import run_ray

    # An unknown model fails inside train.run on every attempt: 1 try + 1 retry, then reported failed.
    job = plan(make_spec({"single_layers": False}))[0]
    job = dataclasses.replace(job, id="bad-job", config=dataclasses.replace(job.config, model="no-such-model"))
    done = []
    run_ray([job], str(tmp_path), lambda job_id, status: done.append((job_id, status)), max_retries=1, log=lambda m: None)
    assert done == [(job.id, "failed")]
    path = tmp_path / "jobs" / job.id
    attempts = json.loads((path / "attempts.json").read_text())
    assert [(x["attempt"], x["status"]) for x in attempts] == [(1, "failed"), (2, "failed")]
    assert (path / "error.txt").is_file()


@pytest.mark.slow
def test_procs_per_job_runs_each_job_over_that_many_processes(local_ray, tmp_path):
    """--procs-per-job 2: the job's Ray task starts torchrun, and the job trains on 2 processes (gloo)."""
    from onelayer.sweep.ray_executor import run_ray

    job = plan(make_spec({"single_layers": False}))[1]
    tiny = dict(layers="3", warm_start=False, max_steps=2, prompts_per_step=2, num_generations=2,
                max_completion_length=4, task_opts={"n_eval": 4}, save_model=False, save_every=1)
    job = dataclasses.replace(job, id="two-procs", config=dataclasses.replace(job.config, **tiny))
    done = []
    run_ray([job], str(tmp_path), lambda job_id, status: done.append((job_id, status)), num_cpus=2, procs=2,
            max_retries=0, log=lambda m: None)
    assert done == [("two-procs", "done")]
    record = json.loads((tmp_path / "jobs" / "two-procs" / "eval.json").read_text())
    assert record["parallel"]["world_size"] == 2 and record["steps"] == 2
    # the same job on 2 processes without Ray (the local executor's runner) scores the same, item by item
    from onelayer.sweep.executors import execute_job

    assert execute_job(job, str(tmp_path / "local"), threads=1, nproc=2)[1] == "done"
    local = json.loads((tmp_path / "local" / "jobs" / "two-procs" / "eval.json").read_text())
    assert local["item_scores"] == record["item_scores"] and local["parallel"]["world_size"] == 2
    losses = [[json.loads(line)["loss"] for line in (d / "jobs" / "two-procs" / "metrics.jsonl").open()]
              for d in (tmp_path, tmp_path / "local")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_missing_ray_is_a_config_error(monkeypatch):
    from onelayer.config import ConfigError
    from onelayer.sweep.ray_executor import _import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'onelayer\[ray\]'"):
        _import_ray()
