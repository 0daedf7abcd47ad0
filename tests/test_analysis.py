"""Analysis on hand-built eval records and profiles whose answers are known."""

import math

import numpy as np
import pytest

from onelayer.analysis import (
    concentration,
    contribution,
    contribution_profile,
    correlation_matrix,
    full_gain_summary,
    group_by_condition,
    interpolate_profile,
    inverted_u_null,
    layer_contributions,
    rank_correlation,
)

L = 5
IDS = [f"item{i}" for i in range(10)]


def binary(mean, n=10, offset=0):
    """n 0/1 item scores with exactly round(mean*n) ones, starting at position ``offset``."""
    k = round(mean * n)
    x = np.zeros(n)
    x[[(offset + i) % n for i in range(k)]] = 1.0
    return x.tolist()


def rec(layers, scores, *, seed=0, ids=IDS, num_layers=L, base=None, **extra):
    if layers == "none":
        indices = []
    elif layers == "all":
        indices = list(range(num_layers))
    else:
        indices = [int(x) for x in str(layers).split(",")]
    return {"model": "tiny", "task": "arith", "algo": "grpo", "seed": seed, "layers": str(layers),
            "layer_indices": indices, "num_layers": num_layers, "item_ids": list(ids),
            "item_scores": list(scores), "score": float(np.mean(scores)), "n": len(scores),
            "base_item_scores": list(base) if base is not None else None, **extra}


# --------------------------------------------------------------------------- contribution

def test_contribution_formula():
    assert contribution(0.4, 0.2, 0.6) == pytest.approx(0.5, abs=1e-12)
    assert contribution(0.2, 0.2, 0.6) == 0.0
    assert contribution(0.6, 0.2, 0.6) == pytest.approx(1.0)
    assert contribution(0.1, 0.2, 0.6) == pytest.approx(-0.25)
    assert math.isnan(contribution(0.4, 0.3, 0.3))


def test_layer_contributions_known_values_and_degenerate_cis():
    base, full = binary(0.2), binary(0.6)
    runs = [
        rec("none", base),
        rec("all", full),
        rec("0", base),             # a layer that does nothing: C = 0, every resample agrees
        rec("2", binary(0.4)),      # C = 0.5
        rec("4", full),             # as good as full: C = 1 for every resample
        rec("1,3", binary(0.5)),    # a pair: not a single layer, ignored
    ]
    rows = layer_contributions(runs, n_boot=500)
    assert [r["layer"] for r in rows] == [0, 2, 4]
    by = {r["layer"]: r for r in rows}
    assert [r["relative_depth"] for r in rows] == [0.0, 0.5, 1.0]

    assert by[0]["contribution"] == 0.0
    assert (by[0]["ci_low"], by[0]["ci_high"]) == (0.0, 0.0)
    assert by[4]["contribution"] == pytest.approx(1.0)
    assert by[4]["ci_low"] == pytest.approx(1.0) and by[4]["ci_high"] == pytest.approx(1.0)

    r = by[2]
    assert r["contribution"] == pytest.approx(0.5, abs=1e-12)
    assert r["ci_low"] < 0.5 < r["ci_high"]
    assert r["score"] == pytest.approx(0.4) and r["gain"] == pytest.approx(0.2)
    assert r["base_score"] == pytest.approx(0.2) and r["full_score"] == pytest.approx(0.6)
    assert r["per_seed"] == [pytest.approx(0.5)] and r["n_items"] == 10 and r["n_seeds"] == 1


def test_constant_item_arrays_collapse_the_ci_to_the_point():
    runs = [rec("none", [0.2] * 10), rec("all", [0.6] * 10), rec("3", [0.4] * 10)]
    (row,) = layer_contributions(runs, n_boot=300)
    assert row["contribution"] == pytest.approx(0.5, abs=1e-12)
    assert row["ci_low"] == pytest.approx(0.5, abs=1e-12) and row["ci_high"] == pytest.approx(0.5, abs=1e-12)
    assert row["relative_depth"] == 0.75


def test_several_seeds_point_estimate_from_averaged_scores_and_seed_bootstrap():
    # seed 0: base .2 full .6 layer .4 -> C .5;  seed 1: base .2 full .4 layer .4 -> C 1
    # averaged: base .2 full .5 layer .4 -> C = .2/.3;  constant items, so only the seed draw varies
    runs = [
        rec("none", [0.2] * 10, seed=0), rec("all", [0.6] * 10, seed=0), rec("1", [0.4] * 10, seed=0),
        rec("none", [0.2] * 10, seed=1), rec("all", [0.4] * 10, seed=1), rec("1", [0.4] * 10, seed=1),
    ]
    (row,) = layer_contributions(runs, n_boot=1000)
    assert row["contribution"] == pytest.approx(2 / 3)
    assert row["per_seed"] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert row["seeds"] == [0, 1] and row["n_seeds"] == 2
    # resamples are {0,0} -> .5, {1,1} -> 1, mixed -> 2/3; each pure draw has probability 1/4
    assert row["ci_low"] == pytest.approx(0.5) and row["ci_high"] == pytest.approx(1.0)


def test_full_run_on_more_seeds_than_the_layer_widens_only_the_denominator():
    # full on seeds 0 and 1 (.6, .4), base .2 on both, the layer on seed 0 only (.4): the denominator is
    # the mean full gain over both seeds, .3, so C = .2/.3; the seed draw of the full run alone moves it:
    # {0,0} -> .2/.4 = .5, {1,1} -> .2/.2 = 1
    runs = [
        rec("none", [0.2] * 10, seed=0), rec("all", [0.6] * 10, seed=0), rec("1", [0.4] * 10, seed=0),
        rec("all", [0.4] * 10, seed=1, base=[0.2] * 10),  # its base scores come with the full run
    ]
    (row,) = layer_contributions(runs, n_boot=1000)
    assert row["contribution"] == pytest.approx(2 / 3) and row["full_score"] == pytest.approx(0.5)
    assert row["n_seeds"] == 1 and row["n_full_seeds"] == 2 and row["per_seed"] == [pytest.approx(0.5)]
    assert row["ci_low"] == pytest.approx(0.5) and row["ci_high"] == pytest.approx(1.0)


def test_runs_are_matched_by_item_id_not_position():
    base, full, layer = binary(0.2), binary(0.6, offset=3), binary(0.4, offset=5)
    perm = np.random.default_rng(1).permutation(10)
    shuffled = rec("2", [layer[i] for i in perm], ids=[IDS[i] for i in perm])
    a = layer_contributions([rec("none", base), rec("all", full), rec("2", layer)], n_boot=200)
    b = layer_contributions([rec("none", base), rec("all", full), shuffled], n_boot=200)
    assert a[0]["contribution"] == b[0]["contribution"]
    assert (a[0]["ci_low"], a[0]["ci_high"]) == (b[0]["ci_low"], b[0]["ci_high"])


def test_mismatched_item_ids_raise():
    other = [f"other{i}" for i in range(10)]
    runs = [rec("none", binary(0.2)), rec("all", binary(0.6)), rec("2", binary(0.4), ids=other)]
    with pytest.raises(ValueError, match="different eval items"):
        layer_contributions(runs, n_boot=10)
    with pytest.raises(ValueError, match="different eval items"):
        full_gain_summary([rec("none", binary(0.2)), rec("all", binary(0.6), ids=IDS[:9] + ["x"])])


def test_missing_full_run_mixed_conditions_and_missing_item_scores_raise():
    with pytest.raises(ValueError, match="full-parameter"):
        layer_contributions([rec("none", binary(0.2)), rec("1", binary(0.4))], n_boot=10)
    with pytest.raises(ValueError, match="several conditions"):
        layer_contributions([rec("none", binary(0.2)), rec("all", binary(0.6), algo="gigpo")], n_boot=10)
    bad = rec("1", binary(0.4))
    del bad["item_scores"]
    with pytest.raises(ValueError, match="per-item"):
        layer_contributions([rec("none", binary(0.2)), rec("all", binary(0.6)), bad], n_boot=10)


def test_base_scores_fall_back_to_base_item_scores_of_trained_runs():
    base = binary(0.2)
    runs = [rec("all", binary(0.6), base=base), rec("2", binary(0.4), base=base)]
    (row,) = layer_contributions(runs, n_boot=100)
    assert row["contribution"] == pytest.approx(0.5)


def test_group_by_condition_and_profile():
    runs = [rec("none", binary(0.2)), rec("all", binary(0.6), algo="gigpo")]
    assert sorted(group_by_condition(runs)) == ["tiny/arith/gigpo", "tiny/arith/grpo"]
    rows = [{"layer": 1, "relative_depth": 0.5, "contribution": 0.3},
            {"layer": 0, "relative_depth": 0.0, "contribution": 0.1}]
    assert contribution_profile(rows) == ([0.0, 0.5], [0.1, 0.3])


def test_vectorised_bootstrap_draws_one_resample_for_10_layers_500_items_3_seeds(monkeypatch):
    """Vectorised: one (n_boot, n_items) item resample shared by every run and one seed resample per seed set,
    not a draw per bootstrap replicate, run or layer (a loop of 2000 x 32 draws took seconds)."""
    import importlib

    contrib = importlib.import_module("onelayer.analysis.contribution")  # the package's `contribution` is a function

    draws = {"items": [], "seeds": []}
    item_counts, seed_weights = contrib._item_counts, contrib._seed_weights
    monkeypatch.setattr(contrib, "_item_counts", lambda *a: draws["items"].append(item_counts(*a)) or draws["items"][-1])
    monkeypatch.setattr(contrib, "_seed_weights", lambda *a: draws["seeds"].append(seed_weights(*a)) or draws["seeds"][-1])
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(500)]
    runs = []
    for seed in range(3):
        runs.append(rec("none", rng.binomial(1, 0.3, 500), seed=seed, ids=ids, num_layers=10))
        runs.append(rec("all", rng.binomial(1, 0.7, 500), seed=seed, ids=ids, num_layers=10))
        for layer in range(10):
            runs.append(rec(str(layer), rng.binomial(1, 0.3 + 0.04 * layer, 500), seed=seed, ids=ids, num_layers=10))
    rows = layer_contributions(runs)
    assert len(rows) == 10 and all(r["ci_low"] <= r["contribution"] <= r["ci_high"] for r in rows)
    assert [d.shape for d in draws["items"]] == [(2000, 500)]
    assert [d.shape for d in draws["seeds"]] == [(2000, 3)]  # all 32 runs have the same 3 seeds


# --------------------------------------------------------------------------- full gain, concentration

def test_full_gain_noise_flag():
    base = binary(0.5)
    flipped = list(base)
    flipped[0], flipped[9] = 1.0 - flipped[0], 1.0 - flipped[9]  # one item gained, one lost
    s = full_gain_summary([rec("none", base), rec("all", flipped)], n_boot=500)
    assert s["gain"] == pytest.approx(0.0) and s["ci_low"] <= 0.0 <= s["ci_high"]
    assert s["noise"] is True

    ids = [f"q{i}" for i in range(50)]
    s = full_gain_summary([rec("none", binary(0.2, n=50), ids=ids), rec("all", binary(0.8, n=50), ids=ids)],
                          n_boot=500)
    assert s["gain"] == pytest.approx(0.6) and s["ci_low"] > 0.3
    assert s["noise"] is False
    assert s["per_seed"] == [pytest.approx(0.6)]

    # identical arrays: the CI collapses to 0 and 0 is inside it
    s = full_gain_summary([rec("none", base), rec("all", base)], n_boot=100)
    assert (s["ci_low"], s["ci_high"]) == (0.0, 0.0) and s["noise"] is True


def test_concentration_on_a_5_layer_profile():
    cs = [0.1, 0.5, 0.9, 0.8, -0.2]
    rows = [{"layer": i, "contribution": c} for i, c in enumerate(cs)]
    c = concentration(rows)
    assert c["best_layer"] == 2 and c["best_recovery"] == 0.9
    assert c["n_layers_ge_0_8"] == 2  # 0.8 itself counts
    assert c["top3_share"] == pytest.approx((0.9 + 0.8 + 0.5) / (0.1 + 0.5 + 0.9 + 0.8))

    c = concentration([{"layer": i, "contribution": -0.1 * (i + 1)} for i in range(5)])
    assert c["best_layer"] == 0 and c["n_layers_ge_0_8"] == 0 and math.isnan(c["top3_share"])
    c = concentration([{"layer": 0, "contribution": float("nan")}])
    assert c["best_layer"] is None and math.isnan(c["best_recovery"])


# --------------------------------------------------------------------------- ranks

def test_interpolate_profile():
    out = interpolate_profile([1.0, 0.0], [2.0, 0.0], [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 2.0])


def test_rank_correlation_monotone_reversed_and_random():
    a = np.arange(8, dtype=float)
    r = rank_correlation(a, a ** 2)
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0) and r["n"] == 8
    assert 1 / 2001 <= r["spearman_p"] < 0.005 and 1 / 2001 <= r["kendall_p"] < 0.005

    r = rank_correlation(a, -a)
    assert r["spearman"] == pytest.approx(-1.0) and r["kendall"] == pytest.approx(-1.0)
    assert r["spearman_p"] < 0.005 and r["kendall_p"] < 0.005

    r = rank_correlation(a, [3, 6, 0, 5, 1, 7, 2, 4])  # an unrelated order
    assert abs(r["spearman"]) < 0.3
    assert r["spearman_p"] > 0.3 and r["kendall_p"] > 0.3


def test_rank_correlation_inputs_ties_and_constants():
    d = [i / 7 for i in range(8)]
    vals = [0.1, 0.4, 0.7, 0.9, 0.8, 0.5, 0.3, 0.2]
    as_dict = rank_correlation(dict(zip(d, vals)), dict(zip(d, vals)), n_perm=200)
    as_pair = rank_correlation((d, vals), (list(reversed(d)), list(reversed(vals))), n_perm=200)
    assert as_dict["spearman"] == pytest.approx(1.0) and as_pair["spearman"] == pytest.approx(1.0)

    r = rank_correlation([1, 2, 2, 3], [1, 2, 2, 3], n_perm=200)  # ties: tau-b still 1
    assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)

    r = rank_correlation([1, 2, 3], [5, 5, 5], n_perm=50)
    assert math.isnan(r["spearman"]) and math.isnan(r["kendall_p"])
    with pytest.raises(ValueError):
        rank_correlation([1, 2, 3], [1, 2])


def test_interpolated_8_vs_12_layer_profiles_of_the_same_shape_agree():
    def shape(d):
        return np.sin(np.pi * d) + 0.3 * d  # middle-heavy, not symmetric

    d8, d12 = np.linspace(0, 1, 8), np.linspace(0, 1, 12)
    r = rank_correlation((d8, shape(d8)), (d12, shape(d12)))
    assert r["n"] == 8  # compared on the coarser profile's depths
    assert r["spearman"] > 0.95 and r["kendall"] > 0.85 and r["spearman_p"] < 0.01


def test_inverted_u_null():
    d = np.arange(8) / 7
    v = 0.9 - 3.0 * (d - 0.5) ** 2  # exactly quadratic, peaked mid-stack (symmetric: ties)
    n = inverted_u_null(d, v)
    assert n["rho_null"] == pytest.approx(1.0)
    assert n["c"] == pytest.approx(-3.0) and n["peak_depth"] == pytest.approx(0.5) and n["r2"] == pytest.approx(1.0)

    u = inverted_u_null(d, 3.0 * (d - 0.5) ** 2 + 0.1 * d)  # a U: c > 0 is not allowed -> best line
    assert u["c"] == 0.0 and math.isnan(u["peak_depth"])
    line = np.polyfit(d, 3.0 * (d - 0.5) ** 2 + 0.1 * d, 1)
    assert u["b"] == pytest.approx(line[0]) and u["a"] == pytest.approx(line[1])


def test_correlation_matrix():
    d8, d12 = np.linspace(0, 1, 8), np.linspace(0, 1, 12)
    profiles = {
        "up8": (d8, d8),
        "up12": (d12, d12 ** 2),
        "down8": (d8, 1 - d8),
    }
    m = correlation_matrix(profiles, n_perm=300)
    assert m["names"] == ["up8", "up12", "down8"]
    s = np.array(m["spearman"])
    np.testing.assert_allclose(s, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-9)
    np.testing.assert_allclose(np.array(m["kendall"]), s, atol=1e-9)
    p = np.array(m["spearman_p"])
    assert np.isnan(np.diag(p)).all() and (p[~np.eye(3, dtype=bool)] < 0.01).all()
    assert set(m["null_rho"]) == set(profiles) and m["null_rho"]["up8"] == pytest.approx(1.0)
    assert m["null"]["down8"]["c"] <= 0.0
