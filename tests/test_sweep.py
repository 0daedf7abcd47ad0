"""Sweeps: deterministic plans, the results store, resume after SIGKILL, and executor agreement."""

import csv
import json
import os
import random
import signal
import subprocess
import sys

import pytest

from helpers import kill_seed, poll_until
from onelayer.cli import main
from onelayer.config import ConfigError
from onelayer.models.layer_spec import LayerSpecError
from onelayer.sweep import make_spec, plan

SMALL = ["--task-opt", "n_eval=200", "--set", "save_model=false"]


def test_default_plan_is_base_full_and_every_layer_with_stable_ids():
    jobs = plan(make_spec({}))
    # base, full and every layer on seed 0, then the full job on seed 1 (the default full_seeds)
    assert [(j.layers, j.seed) for j in jobs] == [("none", 0), ("all", 0)] + [(str(i), 0) for i in range(8)] + [("all", 1)]
    assert [j.id for j in jobs] == [j.id for j in plan(make_spec({}))]
    assert len({j.id for j in jobs}) == 11 and all(j.condition == "tiny-qwen3/arith/grpo" for j in jobs)
    other = plan(make_spec({"train": {"learning_rate": 3e-4}}))
    assert not {j.id for j in jobs} & {j.id for j in other}  # a different config never reuses a job


def test_plan_crosses_axes_and_validates():
    jobs = plan(make_spec({"algos": ["grpo", "dr_grpo"], "seeds": [0, 1], "single_layers": False, "layer_sets": ["middle:2"],
                           "full_seeds": [1, 2]}))
    assert len(jobs) == 2 * (2 * 3 + 1)  # seed 2 adds one full job per algorithm; seed 1 is a seed already
    assert [(j.layers, j.seed) for j in jobs if j.seed == 2] == [("all", 2), ("all", 2)]
    with pytest.raises(LayerSpecError, match="8 layers"):
        plan(make_spec({"layer_sets": ["12"]}))
    with pytest.raises(ConfigError, match="'full_seeds': 'a' is not a seed"):
        make_spec({"full_seeds": ["a"]})
    with pytest.raises(ConfigError, match="unknown sweep key 'model'"):
        make_spec({"model": "x"})
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        plan(make_spec({"train": {"lr": 1}}))


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def sweep_args(out, *extra):
    return ["sweep", "--out", str(out), "--no-single-layers", "--layer-set", "3", "--full-seeds", "none", *SMALL, *extra]


@pytest.mark.slow
def test_sweep_writes_store_and_rerun_skips_done_jobs(base_dir, tmp_path):
    out = tmp_path / "sw"
    assert main(sweep_args(out, "--set", "max_steps=4")) == 0
    rows = read_csv(out / "results.csv")
    assert [r["layers"] for r in rows] == ["none", "all", "3"] and all(r["status"] == "done" for r in rows)
    assert (out / "results.parquet").is_file() and (out / "report.html").is_file()
    assert len(list((out / "plots").glob("*.png"))) == 4
    contrib = read_csv(out / "contributions.csv")
    assert [c["layer"] for c in contrib] == ["3"]
    for col in ("condition", "layer", "relative_depth", "contribution", "ci_low", "ci_high"):
        assert col in contrib[0]
    assert float(contrib[0]["relative_depth"]) == pytest.approx(3 / 7)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/eval.json")}
    assert main(sweep_args(out, "--set", "max_steps=4")) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/eval.json")} == mtimes


@pytest.mark.slow
def test_processes_executor_matches_local(base_dir, tmp_path):
    common = ["--set", "max_steps=3", "--set", "threads=1"]
    assert main(sweep_args(tmp_path / "a", *common)) == 0
    assert main(sweep_args(tmp_path / "b", *common, "--executor", "processes", "--workers", "2")) == 0
    a, b = read_csv(tmp_path / "a" / "results.csv"), read_csv(tmp_path / "b" / "results.csv")
    assert [(r["job_id"], r["score"]) for r in a] == [(r["job_id"], r["score"]) for r in b]


def steps_logged(out):
    return sum(len(p.read_text().splitlines()) for p in out.glob("jobs/*/metrics.jsonl"))


@pytest.mark.slow
def test_sigkill_at_random_point_then_rerun_completes_without_rerunning_done_jobs(base_dir, tmp_path):
    out = tmp_path / "kill"
    args = [sys.executable, "-m", "onelayer.cli", *sweep_args(out, "--layer-set", "5", "--set", "max_steps=40",
                                                               "--set", "save_every=3")]
    # Kill at a random point of the training work (3 trained jobs x 40 steps), found by polling the
    # metrics files rather than by wall-clock time, so a faster machine or trainer cannot finish first.
    seed = kill_seed()
    target = random.Random(seed).randrange(0, 3 * 40 - 4)
    print(f"kill point: after {target} of 120 logged steps (seed {seed}; ONELAYER_KILL_SEED={seed} replays it)")
    proc = subprocess.Popen(args, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll_until(lambda: steps_logged(out) >= target or proc.poll() is not None, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/eval.json")}
    assert len(done_before) < 4, "the sweep finished before it was killed"
    res = subprocess.run(args, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # finished jobs were not run again
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    for path in out.rglob("*.json"):
        json.loads(path.read_text())  # no torn file anywhere
    for path in out.glob("jobs/*/metrics.jsonl"):
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))


@pytest.mark.slow
def test_failed_job_is_resumed_and_retry_failed_restarts_it(base_dir, tmp_path):
    out = tmp_path / "fail"
    assert main(sweep_args(out, "--set", "max_steps=4")) == 0
    job = next(p for p in out.glob("jobs/*") if json.loads((p / "eval.json").read_text())["layers"] == "3")
    others = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/eval.json") if p.parent != job}
    (job / "eval.json").unlink()
    (job / "status.json").write_text(json.dumps({"status": "failed", "error": "simulated"}))
    assert read_csv(out / "results.csv")[2]["status"] == "done"  # table written before the simulated failure
    assert main(sweep_args(out, "--set", "max_steps=4")) == 0  # resumed from its checkpoint at step 4
    assert (job / "eval.json").is_file() and len((job / "metrics.jsonl").read_text().splitlines()) == 4
    (job / "status.json").write_text(json.dumps({"status": "failed", "error": "simulated"}))
    assert main(sweep_args(out, "--set", "max_steps=4", "--retry-failed")) == 0
    assert json.loads((job / "status.json").read_text())["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_single_layer_list_and_the_extreme_seeds_pass():
    from onelayer.sweep.plan import extreme_jobs

    spec = make_spec({"single_layers": "0,-1,3", "extreme_seeds": [1, 2]})
    assert [(j.layers, j.seed) for j in plan(spec)] == [("none", 0), ("all", 0), ("0", 0), ("3", 0), ("7", 0), ("all", 1)]
    assert [j.layers for j in plan(make_spec({"single_layers": "0", "full_seeds": "none"}))] == ["none", "all", "0"]
    assert len(plan(make_spec({"single_layers": "0", "seeds": [0, 1]}))) == 6  # seed 1 is a seed already
    with pytest.raises(LayerSpecError, match="8 layers"):
        plan(make_spec({"single_layers": [8]}))
    rows = [{"condition": "tiny-qwen3/arith/grpo", "layer": str(layer), "contribution": str(c)}
            for layer, c in ((0, 0.9), (3, -0.2), (7, 0.4))]
    more = extreme_jobs(spec, rows)
    assert [(j.layers, j.seed) for j in more] == [(layers, s) for s in (1, 2) for layers in ("all", "0", "3")]
    assert extreme_jobs(make_spec({}), rows) == []
