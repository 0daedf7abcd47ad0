"""Sweeps over a learning-rate grid: the plan, the rate chosen by the train-split check, and the side-by-side
profiles at the fixed and the tuned rates."""

import csv
import json

import pytest

from onelayer.analysis.lr_grid import choose_rates, rate_profiles, selection_score
from onelayer.cli import main
from onelayer.config import ConfigError
from onelayer.sweep import make_spec, plan


def test_grid_plan_runs_every_trained_layer_set_at_every_rate_with_a_train_split_check():
    jobs = plan(make_spec({"lr_grid": "3e-4,1e-3", "full_seeds": "none", "single_layers": [0, 7]}))
    base = [j for j in jobs if j.layers == "none"]
    assert len(base) == 1 and base[0].config.check_every is None  # the base trains nothing: no rate
    trained = [j for j in jobs if j.layers != "none"]
    # the fixed rate (the task's 1e-4) joins the grid
    assert sorted({(j.layers, j.config.learning_rate) for j in trained}) == sorted(
        (layers, r) for layers in ("all", "0", "7") for r in (1e-4, 3e-4, 1e-3))
    for j in trained:  # one check at step 0 and one at the end, on 200 held-out train items; the last weights kept
        assert (j.config.check_every, j.config.check_items, j.config.keep_best) == (300, 200, False)
    assert len({j.id for j in jobs}) == len(jobs) == 10
    assert [j.id for j in jobs] == [j.id for j in plan(make_spec({"lr_grid": "1e-3,3e-4", "full_seeds": "none",
                                                                  "single_layers": [0, 7]}))]
    kept = plan(make_spec({"lr_grid": "1e-3", "single_layers": False, "full_seeds": "none",
                           "train": {"check_items": 80, "keep_best": True}}))
    assert {(j.config.check_items, j.config.keep_best) for j in kept if j.layers != "none"} == {(80, True)}


def test_grid_input_errors_name_the_problem():
    with pytest.raises(ConfigError, match="'lr_grid': 'x' is not a learning rate"):
        make_spec({"lr_grid": "1e-4,x"})
    with pytest.raises(ConfigError, match="not a learning rate"):
        make_spec({"lr_grid": "-1e-4"})
    with pytest.raises(ConfigError, match="--lr-grid and a training learning_rate"):
        make_spec({"lr_grid": "1e-4", "train": {"learning_rate": 1e-3}})


def _record(layers, lr, seed, check, eval_scores, indices=None):
    return {"model": "m", "task": "t", "algo": "a", "layers": layers, "seed": seed, "learning_rate": lr,
            "layer_indices": indices if indices is not None else ([] if layers == "none" else [0, 1]),
            "num_layers": 2, "selected_step": 10, "checks": [{"step": 0, "score": 0.1}, {"step": 10, "score": check}],
            "item_ids": [str(i) for i in range(len(eval_scores))], "item_scores": eval_scores}


def test_the_rate_is_chosen_by_the_train_split_check_never_by_the_eval_split():
    ones, zeros = [1.0] * 10, [0.0] * 10
    runs = [_record("none", None, 0, float("nan"), zeros),
            # the eval split prefers 1e-3, the check prefers 3e-4: the check decides
            _record("all", 1e-4, 0, 0.5, [1.0] * 5 + [0.0] * 5), _record("all", 3e-4, 0, 0.7, zeros),
            _record("all", 1e-3, 0, 0.6, ones),
            # a tie on the check goes to the fixed rate, then to the lower rate
            _record("0", 1e-4, 0, 0.4, zeros, [0]), _record("0", 1e-3, 0, 0.4, ones, [0]),
            _record("1", 3e-4, 0, 0.4, zeros, [1]), _record("1", 1e-3, 0, 0.4, ones, [1])]
    chosen = {(r["layers"], r["learning_rate"]) for r in choose_rates(runs, fixed=1e-4)}
    assert chosen == {("none", None), ("all", 3e-4), ("0", 1e-4), ("1", 3e-4)}
    assert selection_score(runs[1]) == 0.5
    profiles = rate_profiles(runs, fixed=1e-4)
    assert set(profiles["profiles"]) == {1e-4, 3e-4, 1e-3, "tuned"} - {3e-4} | {3e-4}
    assert profiles["chosen"] == {"all": [3e-4], "0": [1e-4], "1": [3e-4]}
    assert profiles["full_gain"]["tuned"]["gain"] == 0.0  # the chosen full run scores 0 on the eval split
    with pytest.raises(ValueError, match="no run has a train-split check"):
        choose_rates([{**r, "checks": []} for r in runs], fixed=1e-4)


@pytest.mark.slow
def test_a_grid_sweep_writes_both_profiles_side_by_side(base_dir, tmp_path):
    out = tmp_path / "grid"
    assert main(["sweep", "--out", str(out), "--no-single-layers", "--layer-set", "3", "--layer-set", "5",
                 "--full-seeds", "none", "--lr-grid", "1e-3", "--lr-check-items", "40", "--task-opt", "n_eval=100",
                 "--set", "save_model=false", "--set", "max_steps=4"]) == 0
    with open(out / "lr_grid.csv") as fh:
        grid = list(csv.DictReader(fh))
    assert {r["rate"] for r in grid} == {"0.0001", "0.001", "tuned"}
    assert {r["layer"] for r in grid} == {"full", "3", "5"}
    tuned = [r for r in grid if r["rate"] == "tuned"]
    assert all(r["chosen_rates"] in ("0.0001", "0.001") for r in tuned)
    with open(out / "contributions.csv") as fh:
        contrib = list(csv.DictReader(fh))
    assert [r["layer"] for r in contrib] == ["3", "5"] and all(r["tuned_contribution"] != "" for r in contrib)
    summary = json.loads((out / "summary.json").read_text())["tiny-qwen3/arith/grpo"]
    assert summary["lr_grid"]["fixed"] == 1e-4 and "Spearman" in summary["lr_grid"]["summary"]
    assert "Learning-rate grid" in (out / "report.html").read_text()
    for job in (out / "jobs").iterdir():  # every trained job checked at step 0 and the last step
        ev = json.loads((job / "eval.json").read_text())
        assert ev["layers"] == "none" or [c["step"] for c in ev["checks"]] == [0, 4]
