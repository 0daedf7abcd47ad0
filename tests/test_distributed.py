"""One job over several processes (onelayer.train.distributed), on CPU with gloo: two-process DDP and FSDP runs
match a one-process run of the same global batch (losses per step, weights, train-split checks and the weights
kept from them), for full-parameter RL with a KL reference and several minibatches, and for one middle block; a
run whose rank is SIGKILLed resumes from its sharded checkpoint and its checks; bad input fails in one line, in a
torchrun process too, which leaves with its exit status; the process count is in the config hash, not in what a
resume matches.

The rollout is the one thing the process count changes: each rank samples its share of the prompts from its own
stream. The equivalence tests therefore inject a sampler that draws each prompt's completions from a generator
seeded by the prompt itself (`PerPromptSampler`), so every prompt gets the same completions whichever process and
batch it is in; everything after the rollout (advantages, log-probs, the update, checkpoints, eval) is onelayer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import kill_seed, poll_until
from onelayer.policy import fused_ops, kernels
from onelayer.rollout import RolloutBatch, left_pad, sample

# two update passes: the second one's ratios differ from 1, so its losses are not ~0 as a first pass's are
SETTINGS = {"max_steps": 3, "prompts_per_step": 4, "num_generations": 2, "max_completion_length": 4,
            "num_iterations": 2, "learning_rate": 1e-3, "task": "arith-digits", "task_opts": {"n_eval": 8}, "warm_start": False,
            "threads": 1, "progress": False, "save_every": 100}


def digits(prompts, completions, **_):
    """A reward a random policy earns now and then: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


class PerPromptSampler:
    """`rollout.sample` per prompt, from a generator seeded by the prompt's tokens and the call count (one call
    per step): a prompt's completions do not depend on the other prompts of its batch."""

    captures_hidden_states = False

    def __init__(self):
        self.calls = 0

    def __call__(self, model, prompts, *, num_generations, max_new_tokens, pad_id, generator=None, **kw):
        self.calls += 1
        kw = {k: v for k, v in kw.items() if k in ("temperature", "top_p")}
        parts = [sample(model, [p], num_generations=num_generations, max_new_tokens=max_new_tokens, eos_id=-1,
                        pad_id=pad_id, generator=torch.Generator().manual_seed(zlib.crc32(str(p).encode()) + self.calls),
                        **kw) for p in prompts]
        ids, mask = left_pad(prompts, pad_id)
        cat = lambda name: torch.cat([getattr(b, name) for b in parts])
        return RolloutBatch.assemble(ids, mask, cat("completion_ids"), cat("completion_mask").bool(), cat("logprobs"),
                                     num_generations)

    def sync_weights(self, model) -> int:
        return 0


def digits_task(**options):
    from onelayer import tasks
    from onelayer.tasks.rewards import RewardFuncTask

    return RewardFuncTask(tasks.make("arith", **options), [digits])


def run_tiny(settings: dict, out: str, lean: bool = True) -> dict:
    """One process of a tiny run (or the whole of a one-process one) with the per-prompt sampler; `lean=False`:
    the model's own forward everywhere, as under FSDP (whose hooks rule the lean paths out). One matmul kernel and
    the torch ops of the training forward in every process: kernels are chosen by measuring, per token band (one
    process's band is not two's) and per process, and the choices agree to float rounding only, which AdamW at
    this rate grows past 1e-5 on the weights; this test is about the distributed step, `test_fused_ops` about the
    compiled ops. The patches are undone afterwards (the one-process runs share pytest's process)."""
    import onelayer.policy.support as support
    import onelayer.train.loop as loop
    from onelayer import tasks
    from onelayer.config import make_config

    tasks.register("arith-digits", digits_task)
    forced = {fused_ops.ENV: "off", kernels.ENV: "default"}
    saved = support.lean_support, loop.rollout_sampler, {k: os.environ.get(k) for k in forced}
    os.environ.update(forced)
    if not lean:
        support.lean_support = lambda model: "the model's own forward, as under FSDP"
    loop.rollout_sampler = lambda *a, **k: PerPromptSampler()
    try:
        return loop.run(make_config(settings), out, log=lambda *_: None)
    finally:
        support.lean_support, loop.rollout_sampler, modes = saved
        for key, value in modes.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def _worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    from onelayer.train.distributed import leave

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), ONELAYER_DIST_TIMEOUT="180")  # a stuck collective fails the test
    run_tiny(settings, out)  # an exception reaches the parent (torch.multiprocessing) with its traceback
    leave(0)  # as a torchrun process of `onelayer train` does


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, settings: dict, out: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(n, free_port(), settings, str(out)), nprocs=n, start_method="spawn")


def metrics(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    """model/'s tensors: the kept check's weights."""
    return load_file(out / "model" / "model.safetensors")


def trained(out: Path) -> dict:
    """The last checkpoint's trainable tensors: the weights after the last step, whichever check was kept."""
    ckpt = out / "checkpoint"
    if not (ckpt / ".metadata").is_file():
        return load_file(ckpt / "trainable.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, out / "trained.pt")
    tensors = torch.load(out / "trained.pt", weights_only=True)["model"]
    return {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # the tiny models' head is tied


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# the equivalence runs: every layer (FSDP's root unit holds the embeddings and the tied head) with a KL reference
# and two minibatches in one update pass (the second's ratios differ from 1); one middle block with the plain loss,
# two passes over one minibatch. Both take two optimizer steps a step (more let AdamW grow float differences past
# 1e-5 as a change of thread count does) and keep the best train-split check (one a step), so the checks, the kept
# step and the weights restored from it are compared too.
CASES = {"all": {"layers": "all", "beta": 0.05, "mini_batch_size": 4, "num_iterations": 1, "seed": 8}, "1": {"layers": "1"}}
CHECK = {"check_every": 1, "check_items": 8}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs, per case (in this process: the same code path as a plain `onelayer train`)."""
    runs = {}

    def get(case: str, lean: bool) -> Path:
        if (case, lean) not in runs:
            out = tmp_path_factory.mktemp("one") / case
            run_tiny({**SETTINGS, **CASES[case], **CHECK}, str(out), lean=lean)
            runs[case, lean] = out
        return runs[case, lean]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_on_the_same_global_batch(parallel, case, reference, tmp_path):
    """FSDP runs the model's own forward (its hooks gather the weights), so its one-process run does too: the lean
    forward's float differences, grown by AdamW over the steps, reach 1e-5 on the weights by themselves."""
    one = reference(case, lean=parallel == "ddp")
    two = tmp_path / "two"
    run_processes(2, {**SETTINGS, **CASES[case], **CHECK, "nproc": 2, "parallel": parallel}, two)
    a, b = metrics(one, "loss"), metrics(two, "loss")
    assert len(a) == len(b) == SETTINGS["max_steps"] and any(abs(x) > 1e-4 for x in a)  # a real gradient signal
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    for key in ("grad_norm", "reward_mean", "reward_std", "kl", "clip_frac"):
        assert metrics(two, key) == pytest.approx(metrics(one, key), rel=1e-5, abs=1e-6), key
    if CASES[case].get("beta"):
        assert max(metrics(one, "kl")) > 1e-6  # the reference's log-probs differ from the policy's
    # FSDP: each rank holds half the AdamW state (frozen blocks none); DDP: all of it
    share = 0.5 if parallel == "fsdp" else 1.0
    assert metrics(two, "optimizer_bytes")[-1] == pytest.approx(share * metrics(one, "optimizer_bytes")[-1], rel=0.01)
    assert max_difference(trained(one), trained(two)) < 1e-5
    assert max_difference(weights(one), weights(two)) < 1e-5
    record, base = (json.loads((d / "eval.json").read_text()) for d in (two, one))
    assert record["frozen_unchanged"] and record["parallel"]["method"] == parallel
    assert record["parallel"]["world_size"] == 2
    # the train-split checks: the same scores, the same step kept, its weights in model/
    assert record["checks"] == base["checks"] and len(record["checks"]) == SETTINGS["max_steps"] + 1
    assert record["selected_step"] == base["selected_step"]
    best = load_file(two / "best" / "trainable.safetensors")
    assert json.loads((two / "best" / "state.json").read_text())["step"] == record["selected_step"]
    assert max_difference(best, {k: v for k, v in weights(two).items() if k in best}) == 0
    # the process count is part of the job (its rollouts differ), not of what a resume must match
    config, config_one = (json.loads((d / "config.json").read_text()) for d in (two, one))
    assert config["resume_hash"] == config_one["resume_hash"] == config_one["config_hash"] != config["config_hash"]
    if parallel == "fsdp":
        assert config["forward"].startswith("hf (FSDP")


TRAIN = ["train", "--no-warm-start", "--max-completion-length", "8", "--prompts-per-step", "4", "--num-generations",
         "2", "--task-opt", "n_eval=8", "--threads", "1", "--no-progress", "--save-every", "1", "--no-save-model"]


def _children(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def _step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("rerun_nproc", [2, 1])
def test_a_sigkilled_rank_then_a_rerun_completes_from_the_sharded_checkpoint(rerun_nproc, tmp_path):
    """`onelayer train --nproc 2` (torchrun), rank 1 SIGKILLed after a few checkpoints: torchrun ends the job; the
    same command (or one with another --nproc) resumes from the sharded checkpoint and its train-split checks, and
    finishes."""
    out = tmp_path / "run"
    argv = [*TRAIN, "--layers", "2", "--max-steps", "40", "--parallel", "fsdp", "--check-every", "10", "--check-items",
            "8", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen([sys.executable, "-m", "onelayer", *argv, "--nproc", "2"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = 2 + kill_seed() % 3
    try:
        assert poll_until(lambda: _step(out) >= at, timeout=120), "no checkpoint"
        rank1 = [p for p in _children(job.pid) if _rank_of(p) == 1]
        assert rank1
        os.kill(rank1[0], signal.SIGKILL)
        assert job.wait(timeout=120) != 0
    finally:
        if job.poll() is None:
            job.kill()
    killed_at = _step(out)
    assert 0 < killed_at < 40 and not (out / "eval.json").exists()
    done = subprocess.run([sys.executable, "-m", "onelayer", *argv, "--nproc", str(rerun_nproc)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from the checkpoint at step {killed_at}" in done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    record = json.loads((out / "eval.json").read_text())
    assert record["frozen_unchanged"] and record["steps"] == 40
    assert sorted(c["step"] for c in record["checks"]) == [0, 10, 20, 30, 40]
    best = json.loads((out / "best" / "state.json").read_text())
    assert best["step"] == record["selected_step"] and best["score"] == max(c["score"] for c in record["checks"])


def _fails(capsys, argv: list[str]) -> str:
    from onelayer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "r")]
    assert "must be auto, ddp or fsdp" in _fails(capsys, [*TRAIN, "--parallel", "zero3", *out])
    assert "prompts_per_step 4 does not divide by --nproc 3" in _fails(capsys, [*TRAIN, "--nproc", "3", *out])
    assert "rollout_backend vllm with --nproc 2 is not supported" in _fails(capsys, [*TRAIN, "--nproc", "2",
                                                                                    "--rollout-backend", "vllm", *out])
    # a resume with another global batch
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config_hash": "0" * 16, "prompts_per_step": 8, "num_generations": 2}))
    err = _fails(capsys, [*TRAIN, "--nproc", "2", "--out", str(run)])
    assert "global batch of 8 prompts x 2 completions" in err and "(got 4 x 2)" in err


def test_a_torchrun_process_leaves_with_its_exit_status(tmp_path):
    """A process of a torchrun job (WORLD_SIZE set) ends through os._exit: bad input still prints one line and exits
    2; an uncaught exception prints its traceback and exits 1."""
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                                          os.environ.get("PYTHONPATH", "")])}
    bad = subprocess.run([sys.executable, "-m", "onelayer", *TRAIN, "--parallel", "zero3", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "must be auto, ddp or fsdp" in bad.stderr
    crash = subprocess.run([sys.executable, "-c", "from onelayer.train.distributed import run_and_leave\n"
                            "run_and_leave(lambda: 1 / 0)"], env=env, capture_output=True, text=True, timeout=120)
    assert crash.returncode == 1 and "ZeroDivisionError" in crash.stderr


def test_check_every_mini_batches_and_kl_take_several_processes():
    from onelayer.config import TrainConfig
    from onelayer.train.distributed import check

    check(TrainConfig(prompts_per_step=4, check_every=5, mini_batch_size=3, beta=0.1, parallel="fsdp"), 2, "cpu")


def test_the_process_count_is_in_the_config_hash_not_in_what_a_resume_matches(tmp_path):
    """One process: the hash it always had (every setting but the resume-free ones); more: another job, which a
    killed run of it may still resume on any count."""
    import hashlib

    from onelayer import rundir
    from onelayer.config import TrainConfig

    one, two = TrainConfig(), TrainConfig(nproc=2)
    kept = {k: v for k, v in one.to_dict().items() if k not in rundir.RESUME_FREE_KEYS}
    assert rundir.config_hash(one) == hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
    assert rundir.config_hash(one) == rundir.resume_hash(one) == rundir.resume_hash(two) != rundir.config_hash(two)
    assert rundir.config_hash(TrainConfig(nproc=3)) not in (rundir.config_hash(one), rundir.config_hash(two))
    for saved in ({"config_hash": rundir.config_hash(two), "resume_hash": rundir.resume_hash(two)},
                  {"config_hash": rundir.resume_hash(two)}):  # as written now, and before resume_hash was
        (tmp_path / "config.json").write_text(json.dumps(saved))
        rundir.check_resumable(one, tmp_path)
        rundir.check_resumable(TrainConfig(nproc=4), tmp_path)


def test_a_finished_run_on_another_process_count_is_not_reused(tmp_path):
    from onelayer import rundir
    from onelayer.sweep import make_spec, plan
    from onelayer.sweep.recipes import reuse_finished

    job = plan(make_spec({"single_layers": False}))[0]
    done = tmp_path / "src" / "jobs" / job.id
    done.mkdir(parents=True)
    cfg = dataclasses.replace(job.config, nproc=2)
    (done / "config.json").write_text(json.dumps({"config_hash": rundir.config_hash(cfg)}))
    (done / "eval.json").write_text("{}")
    rundir.set_status(done, "done")
    assert reuse_finished([job], [tmp_path / "src"], tmp_path / "a", log=lambda _: None) == 0
    assert reuse_finished([job], [tmp_path / "src"], tmp_path / "b", log=lambda _: None, nproc=2) == 1


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    from onelayer.config import ConfigError, TrainConfig
    from onelayer.train.distributed import check

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="--nproc 2: only 1 CUDA device"):
        check(TrainConfig(prompts_per_step=4), 2, "cuda")


def test_auto_is_fsdp_only_when_the_state_does_not_fit():
    from onelayer.train.distributed import choose_method

    assert choose_method("auto", 10 * 2**30, 80 * 2**30)[0] == "ddp"
    assert choose_method("auto", 100 * 2**30, 80 * 2**30)[0] == "fsdp"
    assert choose_method("ddp", 100 * 2**30, 80 * 2**30) == ("ddp", "asked for")
