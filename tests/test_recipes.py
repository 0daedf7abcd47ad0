"""`onelayer recipes`: the recipe set from a profile, the run as a sweep, and recipes.csv."""

import csv
import json

import numpy as np
import pytest

from helpers import CONDITION, TINY, source_sweep
from onelayer.cli import main
from onelayer.stats import paired_seed_item_bootstrap_ci, seed_item_bootstrap_ci
from onelayer.sweep.recipes import RecipesSpec, recipes


def test_the_recipe_set_follows_the_profile(tmp_path):
    src = source_sweep(tmp_path / "sweep")
    got = {r.name: (r.layers, r.layer_lr) for r in recipes(RecipesSpec(source=str(src), ks=[1, 3], draws=2),
                                                           src / "contributions.csv", 8)}
    assert got["full"] == ("all", {})
    assert got["only-B1"] == ("0", {}) and got["only-B3"] == ("0,1,2", {})
    assert got["boost-B3"] == ("all", {"0,1,2": 2.0})
    assert got["mid-1"] == ("3", {}) and got["mid-3"] == ("2,3,4", {})
    assert got["worst-1"] == ("7", {}) and got["worst-3"] == ("4,6,7", {})
    draws = {got["random-3-d0"][0], got["random-3-d1"][0]}
    assert len(draws) == 2 and all(len(d.split(",")) == 3 for d in draws)


def test_two_stage_bootstrap_covers_seeds_and_pairs_items():
    rng = np.random.default_rng(0)
    items = rng.random(200)
    same_seeds = np.stack([items, items])  # no seed variation: the CI is the items' alone
    spread = np.stack([items - 0.2, items + 0.2])  # seeds disagree: a wider CI
    lo, hi = seed_item_bootstrap_ci(same_seeds)
    lo2, hi2 = seed_item_bootstrap_ci(spread)
    assert lo < items.mean() < hi and hi2 - lo2 > hi - lo
    # a constant shift on the same items: the paired CI is tight around it, whatever the items' spread
    dlo, dhi = paired_seed_item_bootstrap_ci(same_seeds + 0.05, same_seeds)
    assert dlo == pytest.approx(0.05) and dhi == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same eval items"):
        paired_seed_item_bootstrap_ci(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.slow
def test_recipes_run_as_a_sweep_and_write_the_table(tmp_path):
    src = source_sweep(tmp_path / "sweep")
    out = tmp_path / "recipes"
    assert main(["recipes", "--from", str(src), "--k", "1", "--seeds", "0", "--draws", "1", "--out", str(out)]) == 0
    rows = {r["recipe"]: r for r in csv.DictReader((out / "recipes.csv").open())}
    assert set(rows) == {"full", "only-B1", "boost-B1", "mid-1", "worst-1", "random-1-d0"}
    full, only = rows["full"], rows["only-B1"]
    assert float(full["delta_vs_full"]) == 0 and float(full["trainable_ratio"]) == 1
    assert float(only["trainable_ratio"]) < 0.2 and float(only["optimizer_ratio"]) < 0.2
    assert float(rows["boost-B1"]["trainable_ratio"]) == 1 and rows["boost-B1"]["layer_lr"] == "0=2"
    for r in rows.values():
        assert float(r["ci_low"]) <= float(r["score"]) <= float(r["ci_high"])
        assert float(r["delta_ci_low"]) <= float(r["delta_vs_full"]) <= float(r["delta_ci_high"])
    boost = json.loads(next((out / "jobs").glob("*boost-B1*/eval.json")).read_text())
    assert boost["block_lr"]["0"] == pytest.approx(2 * boost["block_lr"]["1"])
    assert "<h2>Recipes</h2>" in (out / "report.html").read_text()
    # a rerun finds every job done
    assert main(["recipes", "--from", str(src), "--k", "1", "--seeds", "0", "--draws", "1", "--out", str(out)]) == 0


def test_recipes_from_a_directory_without_contributions_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["recipes", "--from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no contributions.csv" in err and "Traceback" not in err


def test_recipes_that_resolve_to_the_same_blocks_keep_their_own_jobs(tmp_path):
    from onelayer.sweep.recipes import recipe_jobs

    src = source_sweep(tmp_path / "sweep")
    spec = RecipesSpec(source=str(src), ks=[1], seeds=[0, 1], draws=0)
    rs = recipes(spec, src / "contributions.csv", 8)
    jobs, names = recipe_jobs(spec.seeds, CONDITION, TINY, rs + [rs[1].__class__("copy-of-only", "only", 1, "0", {})])
    assert len({j.id for j in jobs}) == len(jobs) == 2 * 6
    assert sorted(n for n in names.values() if n == "copy-of-only") == ["copy-of-only"] * 2
    assert sum(n == "only-B1" for n in names.values()) == 2


def test_recipes_set_overrides_the_source_training_settings(tmp_path, capsys):
    src = source_sweep(tmp_path / "sweep")
    out = tmp_path / "recipes"
    assert main(["recipes", "--from", str(src), "--k", "1", "--seeds", "0", "--draws", "0", "--out", str(out),
                 "--set", "max_steps=1"]) == 0
    configs = [json.loads(p.read_text()) for p in (out / "jobs").glob("*/config.json")]
    assert len(configs) == 5 and {c["max_steps"] for c in configs} == {1}
    assert main(["recipes", "--from", str(src), "--set", "layers=0"]) == 2
    assert "what the recipes choose" in capsys.readouterr().err
