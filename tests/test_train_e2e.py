"""End-to-end runs of the real entry points on the tiny model, asserting on the files they write."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from helpers import kill_seed, poll_until
from onelayer.cli import main
from onelayer.io import read_jsonl
from onelayer.models import ModelError, load_policy

pytestmark = pytest.mark.slow
FAST = ["--no-progress", "--task-opt", "n_eval=200"]


def train(out, *args):
    assert main(["train", "--out", str(out), *FAST, *args]) == 0
    return json.loads((out / "eval.json").read_text())


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "onelayer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def test_warm_start_lands_in_band(base_dir):
    record = json.loads((base_dir / "warmstart.json").read_text())
    lo, hi = record["settings"]["band"]
    assert lo <= record["heldout_accuracy"] <= hi


def test_full_run_writes_outputs(base_dir, tmp_path):
    rec = train(tmp_path / "run", "--layers", "all", "--max-steps", "12", "--tensorboard")
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    for key in ("score", "ci95", "n", "task", "layers", "base_score", "gain", "gain_ci95", "frozen_unchanged"):
        assert key in rec
    assert rec["n"] == 200 and rec["layers"] == "all" and rec["trainable_params"] == rec["total_params"]
    assert rec["ci95"][0] <= rec["score"] <= rec["ci95"][1]
    assert rec["gain"] == pytest.approx(rec["score"] - rec["base_score"])
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for key in ("reward_mean", "loss", "kl", "clip_frac", "completion_len", "seconds"):
        assert key in metrics[0]
    model, tok = load_policy(tmp_path / "run" / "model")
    assert model.config.num_hidden_layers == 8 and tok.decode(tok("1+2=").input_ids) == "1+2="
    # the warm start is part of the result: its weights' hash and held-out accuracy are recorded
    ws = json.loads((base_dir / "warmstart.json").read_text())
    assert rec["warm_start"]["heldout_accuracy"] == ws["heldout_accuracy"] and len(rec["warm_start"]["hash"]) == 16
    assert rec["collapsed"] is False and rec["prompt_format"] == "raw" and rec["precision"] == "float32"


def test_single_layer_leaves_frozen_tensors_bit_identical(base_dir, tmp_path):
    rec = train(tmp_path / "mid", "--layers", "middle:1", "--max-steps", "8", "--learning-rate", "1e-3")
    assert rec["layer_indices"] == [3] and rec["frozen_unchanged"] is True and rec["frozen_changed"] == []
    base, _ = load_policy(base_dir)
    trained, _ = load_policy(tmp_path / "mid" / "model")
    trained_params = dict(trained.named_parameters())
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, trained_params[n])}
    assert changed and all(n.startswith("model.layers.3.") for n in changed)


def test_same_seed_gives_identical_eval(base_dir, tmp_path):
    a = train(tmp_path / "a", "--layers", "middle:1", "--max-steps", "6", "--seed", "3")
    b = train(tmp_path / "b", "--layers", "middle:1", "--max-steps", "6", "--seed", "3")
    assert a["score"] == b["score"] and a["item_scores"] == b["item_scores"]


def test_dr_grpo_with_kl_reference(base_dir, tmp_path):
    train(tmp_path / "dr", "--algo", "dr_grpo", "--layers", "2-3", "--beta", "0.1", "--max-steps", "6",
          "--learning-rate", "1e-3")
    metrics = read_jsonl(tmp_path / "dr" / "metrics.jsonl")
    cfg = json.loads((tmp_path / "dr" / "config.json").read_text())
    assert cfg["loss_type"] == "seq-mean-token-sum-norm" and cfg["scale_rewards"] == "none"
    assert metrics[-1]["kl"] > 0  # the policy moved away from the reference copy


def test_eval_command(base_dir, tmp_path):
    assert main(["eval", "--out", str(tmp_path / "e.json"), *FAST]) == 0
    rec = json.loads((tmp_path / "e.json").read_text())
    assert rec["n"] == 200 and rec["task"] == "arith" and rec["ci95"][0] <= rec["score"] <= rec["ci95"][1]


@pytest.mark.parametrize("args,needle", [
    (["--layers", "99"], "index 99 is out of range; this model has 8 layers"),
    (["--layers", "middle:x"], "layer spec 'middle:x'"),
    (["--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["--task", "nope"], "nope"),
    (["--learning-rate", "fast"], "'learning_rate'"),
])
def test_user_errors_exit_2_without_traceback(base_dir, tmp_path, args, needle):
    res = cli("train", "--out", str(tmp_path / "x"), *FAST, *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_layer_spec_fails_before_the_warm_start(tmp_path):
    env = {**os.environ, "ONELAYER_CACHE": str(tmp_path / "empty-cache")}
    res = subprocess.run([sys.executable, "-m", "onelayer.cli", "train", "--out", str(tmp_path / "x"), *FAST,
                          "--layers", "12"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "index 12 is out of range; this model has 8 layers" in res.stderr
    assert "warm start" not in res.stdout + res.stderr
    assert not any((tmp_path / "empty-cache").rglob("*.safetensors"))


def test_unknown_yaml_key_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("layers: all\nnum_generation: 4\n")
    res = cli("train", "--out", str(tmp_path / "x"), "--config", str(tmp_path / "c.yaml"))
    assert res.returncode == 2 and "unknown config key 'num_generation'; did you mean 'num_generations'" in res.stderr


def test_killed_run_resumes_from_checkpoint(base_dir, tmp_path):
    out = tmp_path / "kill"
    args = ["train", "--out", str(out), *FAST, "--layers", "middle:1", "--max-steps", "60", "--save-every", "5"]
    # kill at a random step after the first checkpoint (step 5), found by polling the metrics, not the clock
    seed = kill_seed()
    target = random.Random(seed).randrange(6, 56)
    print(f"kill point: after {target} of 60 logged steps (seed {seed}; ONELAYER_KILL_SEED={seed} replays it)")
    proc = subprocess.Popen([sys.executable, "-m", "onelayer.cli", *args], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, metrics = out / "checkpoint" / "state.json", out / "metrics.jsonl"

    def reached():
        return (state.is_file() and json.loads(state.read_text())["step"] >= 5 and metrics.is_file()
                and len(metrics.read_text().splitlines()) >= target)

    poll_until(lambda: reached() or proc.poll() is not None, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "eval.json").exists(), "run finished before it could be killed"
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "resuming from the checkpoint at step" in res.stdout
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 61))
    assert json.loads((out / "eval.json").read_text())["frozen_unchanged"] is True
    assert json.loads((out / "status.json").read_text())["status"] == "done"


def test_nan_loss_stops_with_message_and_keeps_checkpoint(base_dir, tmp_path, monkeypatch):
    import onelayer.train.update as update

    real = update.policy_loss
    calls = {"n": 0}

    def nan_after_five(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 5 else loss), stats

    monkeypatch.setattr(update, "policy_loss", nan_after_five)
    out = tmp_path / "nan"
    code = main(["train", "--out", str(out), *FAST, "--layers", "3", "--max-steps", "20", "--save-every", "5"])
    assert code == 1
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
    assert len(read_jsonl(out / "metrics.jsonl")) == 5


def test_builtin_qwen2_and_local_dir_round_trip(tmp_path):
    model, tok = load_policy("tiny-qwen2")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_policy(tmp_path / "m")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert tok2("9+9=").input_ids == tok("9+9=").input_ids
    with pytest.raises(ModelError, match="no config.json"):
        load_policy(tmp_path)


@pytest.mark.slow
def test_corrupt_checkpoint_stops_with_one_message(base_dir, tmp_path):
    """A checkpoint that cannot be read stops the resumed run with one message (no traceback) that says what
    to do, and leaves the run's metrics as they were."""
    out = tmp_path / "corrupt"
    args = ["--layers", "middle:1", "--max-steps", "5", "--save-every", "5"]
    train(out, *args)
    (out / "eval.json").unlink()  # as if killed after its last checkpoint
    weights = out / "checkpoint" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    metrics = (out / "metrics.jsonl").read_text()
    res = cli("train", "--out", str(out), *FAST, *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "checkpoint" in res.stderr and "cannot be read" in res.stderr and "Move" in res.stderr
    assert (out / "metrics.jsonl").read_text() == metrics
