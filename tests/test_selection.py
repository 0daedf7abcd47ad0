"""Early stopping by a held-out train-split check: the pure pieces, and end-to-end runs that keep the best weights."""

import json

import pytest
import torch

from onelayer.cli import main
from onelayer.train.selection import BestKeeper, holdout, is_check_step
from onelayer.train.update import warmup_lr


def test_holdout_and_check_steps():
    items = [{"id": i} for i in range(10)]
    rest, check = holdout(items, 3)
    assert [it["id"] for it in check] == [0, 1, 2] and [it["id"] for it in rest] == list(range(3, 10))
    assert len(holdout(items, 50)[1]) == 5  # never more than half the split
    assert [s for s in range(0, 31) if is_check_step(s, 10, 25)] == [0, 10, 20, 25]
    assert not any(is_check_step(s, 0, 25) for s in range(26))


def test_warmup_is_linear_then_flat():
    assert [warmup_lr(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(3e-4, 0, 0) == 3e-4


def test_best_keeper_keeps_the_best_weights_and_survives_a_restart(tmp_path):
    model = torch.nn.Linear(2, 2)
    frozen = model.bias
    frozen.requires_grad_(False)
    keeper = BestKeeper(tmp_path)
    assert keeper.record(0, 0.5, model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert keeper.record(10, 0.7, model)  # new best: the all-ones weights
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not keeper.record(20, 0.7, model)  # a tie keeps the earlier step
    assert not keeper.record(30, 0.1, model)
    again = BestKeeper(tmp_path)  # as a resumed run sees it
    assert [c["step"] for c in again.checks] == [0, 10, 20, 30] and again.best == {"step": 10, "score": 0.7}
    assert again.checked(20) and not again.checked(40)
    again.restore(model)
    assert torch.equal(model.weight, torch.ones(2, 2))


FAST = ["--no-progress", "--task-opt", "n_eval=200", "--no-save-model"]


@pytest.mark.slow
def test_a_destroyed_policy_ends_with_the_base_weights(onelayer_cache, tmp_path):
    out = tmp_path / "absurd"
    assert main(["train", "--out", str(out), *FAST, "--layers", "all", "--max-steps", "8", "--check-every", "4",
                 "--check-items", "64", "--learning-rate", "1.0", "--max-grad-norm", "0"]) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert [c["step"] for c in rec["checks"]] == [0, 4, 8]
    assert rec["checks"][0]["score"] > 0.2 and rec["checks"][-1]["score"] < rec["checks"][0]["score"]
    assert rec["selected_step"] == 0 and rec["check_items"] == 64
    assert rec["score"] == rec["base_score"]  # the base weights, evaluated again: the same greedy answers
    assert rec["frozen_unchanged"] is True


@pytest.mark.slow
def test_checks_survive_a_failed_run_and_its_resume(onelayer_cache, tmp_path, monkeypatch):
    import onelayer.train.update as update

    real, calls = update.policy_loss, {"n": 0}

    def nan_after_six(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 6 else loss), stats

    out = tmp_path / "resume"
    args = ["train", "--out", str(out), *FAST, "--layers", "3", "--max-steps", "10", "--check-every", "4",
            "--save-every", "5"]
    monkeypatch.setattr(update, "policy_loss", nan_after_six)
    assert main(args) == 1  # fails at step 7: checks at 0 and 4 recorded, checkpoint at step 5
    assert [c["step"] for c in json.loads((out / "checks.json").read_text())] == [0, 4]
    monkeypatch.setattr(update, "policy_loss", real)
    assert main(args) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert [c["step"] for c in rec["checks"]] == [0, 4, 8, 10]
    assert rec["selected_step"] in (0, 4, 8, 10)
