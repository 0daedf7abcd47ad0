"""The additivity test: interactions of trained layer pairs, and the sweep's --pairs."""

import numpy as np
import pytest

from onelayer.analysis.additivity import pair_interactions, verdict
from onelayer.sweep import make_spec, plan


def run(layers, indices, seed, scores):
    return {"model": "m", "task": "t", "algo": "grpo", "layers": layers, "layer_indices": indices, "seed": seed,
            "item_scores": list(scores)}


def test_interaction_is_pair_minus_singles_plus_base_with_a_ci():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400).astype(float) * 0.5
    records = [run("none", [], 0, base), run("all", list(range(4)), 0, base + 0.5),
               run("1", [1], 0, base + 0.2), run("2", [2], 0, base + 0.1), run("3", [3], 0, base + 0.1),
               run("1,2", [1, 2], 0, base + 0.3),  # adds up exactly: 0.2 + 0.1
               run("1,3", [1, 3], 0, base + 0.1)]  # overlaps: 0.1 < 0.2 + 0.1
    rows = {r["pair"]: r for r in pair_interactions(records)}
    assert set(rows) == {"1,2", "1,3"}  # the full run of 4 blocks is not a pair
    assert rows["1,2"]["interaction"] == pytest.approx(0.0, abs=1e-12) and rows["1,2"]["adds_up"]
    assert rows["1,3"]["interaction"] == pytest.approx(-0.2) and not rows["1,3"]["adds_up"]
    assert rows["1,3"]["pair_gain"] == pytest.approx(0.1) and rows["1,3"]["sum_of_gains"] == pytest.approx(0.3)
    v = verdict(list(rows.values()))["m/t/grpo"]
    assert v["pairs"] == 2 and len(v["not_additive"]) == 1 and v["not_additive"][0].startswith("1,3")


def test_a_pair_without_its_single_layers_is_skipped():
    records = [run("none", [], 0, [0.0, 1.0]), run("0,1", [0, 1], 0, [1.0, 1.0]), run("0", [0], 0, [0.0, 1.0])]
    assert pair_interactions(records) == []


def test_pairs_adds_every_pair_of_the_named_blocks_once():
    jobs = plan(make_spec({"pairs": ["1,4,6"], "single_layers": False, "full_seeds": []}))
    assert [j.layers for j in jobs] == ["none", "all", "1,4", "1,6", "4,6"]
    jobs = plan(make_spec({"pairs": ["1,4", "4,1"], "single_layers": False, "full_seeds": []}))
    assert [j.layers for j in jobs] == ["none", "all", "1,4"]
