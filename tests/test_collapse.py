"""The collapse guard: the pure check on step metrics, and a forced collapse flagged end to end."""

import json

import pytest

from onelayer.train.collapse import CollapseRule, check_collapse

RULE = CollapseRule(window=3, fraction=0.5, patience=3)


def _steps(rewards, **extra):
    return [{"step": i + 1, "reward_mean": r, **{k: v[i] for k, v in extra.items()}} for i, r in enumerate(rewards)]


def test_reward_collapse_is_found_at_the_step_it_has_lasted_patience_steps():
    flat = _steps([0.6] * 20)
    assert check_collapse(flat, RULE) is None
    falls = _steps([0.6, 0.6, 0.6, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
    c = check_collapse(falls, RULE)
    assert c["signal"] == "reward_mean" and c["step"] == 8 and c["threshold"] == 0.3 and abs(c["start"] - 0.6) < 1e-9
    # a dip that recovers within the patience is not a collapse
    assert check_collapse(_steps([0.6, 0.6, 0.6, 0.0, 0.0, 0.6, 0.6, 0.6, 0.6, 0.6]), RULE) is None
    # a run that never earned reward has nothing to lose
    assert check_collapse(_steps([0.0] * 12), RULE) is None


def test_kl_and_invalid_action_collapses():
    kl = _steps([0.5] * 10, kl=[0.0, 0.1, 0.2] + [3.0] * 7)
    assert check_collapse(kl, RULE)["signal"] == "kl"
    inv = _steps([0.5] * 10, invalid_rate=[0.1] * 3 + [0.9] * 7)
    assert check_collapse(inv, RULE)["signal"] == "invalid_rate"
    assert check_collapse(_steps([0.5] * 10, invalid_rate=[0.1] * 10), RULE) is None


@pytest.mark.slow
def test_absurd_learning_rate_is_flagged_in_eval_json_and_the_sweep(tmp_path):
    from onelayer.cli import main

    out = tmp_path / "sweep"
    rc = main(["sweep", "--out", str(out), "--no-single-layers", "--full-seeds", "none", "--task-opt", "n_eval=200",
               "--set", "max_steps=16", "--set", "learning_rate=1.0", "--set", "max_grad_norm=0",
               "--set", "collapse_window=3", "--set", "save_model=false", "--set", "progress=false"])
    assert rc == 0
    full = next(p for p in (out / "jobs").iterdir() if "-all-" in p.name)
    rec = json.loads((full / "eval.json").read_text())
    assert rec["collapsed"] is True and rec["collapse"]["signal"] == "reward_mean"
    assert rec["collapse"]["step"] <= 16
    base = next(p for p in (out / "jobs").iterdir() if "-none-" in p.name)
    assert json.loads((base / "eval.json").read_text())["collapsed"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiny-qwen3/arith/grpo"]["collapsed_jobs"] == [full.name]
    assert "collapsed" in (out / "results.csv").read_text().splitlines()[0]
    assert "Collapsed runs" in (out / "report.html").read_text()
