"""Contributions at a fixed learning rate and at tuned rates, from a sweep run with `--lr-grid`.

A profile measured at one rate can be an artefact of that rate: a single block may need a larger step
than the full model to move as far. With a grid, every trained layer set ran at every rate. Per layer set
and seed, the *tuned* run is the rate whose held-out **train-split** check scored best (the check of the
weights that were evaluated: `selected_step`); the eval split never takes part in the choice, so the
tuned eval scores are not selected on themselves. Ties go to the fixed rate, then to the lower rate.

`rate_profiles` gives C_l at each rate of the grid and at the tuned rates (`layer_contributions` on the
base runs plus the chosen runs), the full-RL gain of each, and which rates were chosen.
"""

from __future__ import annotations

import math

from onelayer.analysis.contribution import full_gain_summary, layer_contributions, run_kind

LR_GRID_COLUMNS = ["condition", "rate", "layer", "relative_depth", "contribution", "ci_low", "ci_high", "score",
                   "gain", "check_score", "chosen_rates", "n_seeds", "collapsed"]


def selection_score(record: dict) -> float:
    """The train-split check score of the weights a run was evaluated with (nan when it has no check)."""
    step = record.get("selected_step")
    return next((float(c["score"]) for c in record.get("checks") or [] if c["step"] == step), float("nan"))


def choose_rates(records: list[dict], fixed: float) -> list[dict]:
    """Per (layer set, seed), the record whose train-split check scored best; ties: the fixed rate, then the
    lower rate. Base records (nothing trained) pass through."""
    groups: dict[tuple, list[dict]] = {}
    chosen = []
    for r in records:
        if run_kind(r)[0] == "base":
            chosen.append(r)
        else:
            groups.setdefault((str(r["layers"]), r.get("seed")), []).append(r)
    for (layers, seed), runs in groups.items():
        scored = [r for r in runs if math.isfinite(selection_score(r))]
        if not scored:
            raise ValueError(f"layers={layers!r} seed={seed}: no run has a train-split check to choose its rate by "
                             "(rerun the sweep with --lr-grid, which sets check_every)")
        chosen.append(max(scored, key=lambda r: (selection_score(r), r["learning_rate"] == fixed,
                                                 -r["learning_rate"])))
    return chosen


def rate_profiles(runs: list[dict], fixed: float) -> dict:
    """Contribution rows at every rate of the grid and at the tuned rates, for one condition's records.

    Returns {"rates": [...], "fixed": rate, "profiles": {rate or "tuned": rows}, "full_gain": {same keys:
    full_gain_summary}, "chosen": {layer set: [rate per seed]}}; each row as `layer_contributions` gives
    it, with ``check_score`` (the mean train-split check of its runs) added.
    """
    trained = [r for r in runs if run_kind(r)[0] != "base"]
    base = [r for r in runs if run_kind(r)[0] == "base"]
    rates = sorted({float(r["learning_rate"]) for r in trained})
    subsets = {rate: base + [r for r in trained if float(r["learning_rate"]) == rate] for rate in rates}
    subsets["tuned"] = choose_rates(runs, fixed)
    out = {"rates": rates, "fixed": fixed, "profiles": {}, "full_gain": {}, "chosen": {}}
    for key, subset in subsets.items():
        if not any(run_kind(r)[0] == "full" for r in subset):
            continue
        rows = layer_contributions(subset)
        checks = {}
        for r in subset:
            kind, layer = run_kind(r)
            if kind == "layer":
                checks.setdefault(layer, []).append(selection_score(r))
        for row in rows:
            row["check_score"] = sum(checks[row["layer"]]) / len(checks[row["layer"]])
        out["profiles"][key] = rows
        out["full_gain"][key] = full_gain_summary(subset)
    for r in sorted(subsets["tuned"], key=lambda r: (str(r["layers"]), str(r.get("seed")))):
        if run_kind(r)[0] != "base":
            out["chosen"].setdefault(str(r["layers"]), []).append(float(r["learning_rate"]))
    return out


def grid_rows(condition: str, profiles: dict) -> list[dict]:
    """The rows of lr_grid.csv for one condition: the full run and every layer, at each rate and tuned."""
    rows = []
    for key, layer_rows in profiles["profiles"].items():
        rate = key if key == "tuned" else f"{key:g}"
        full = profiles["full_gain"][key]
        rows.append({"condition": condition, "rate": rate, "layer": "full", "score": full["full_score"],
                     "gain": full["gain"], "ci_low": full["ci_low"], "ci_high": full["ci_high"],
                     "chosen_rates": " ".join(f"{r:g}" for r in profiles["chosen"].get("all", [])) if key == "tuned"
                     else "", "n_seeds": full["n_seeds"], "collapsed": full["collapsed"]})
        for row in layer_rows:
            chosen = profiles["chosen"].get(str(row["layer"]), []) if key == "tuned" else []
            rows.append({"condition": condition, "rate": rate, **row,
                         "chosen_rates": " ".join(f"{r:g}" for r in chosen)})
    return rows


def side_by_side(fixed_rows: list[dict], profiles: dict) -> list[dict]:
    """`fixed_rows` (contributions.csv rows at the fixed rate) with the tuned profile's columns added."""
    tuned = {r["layer"]: r for r in profiles["profiles"].get("tuned", [])}
    out = []
    for row in fixed_rows:
        t = tuned.get(row["layer"])
        out.append({**row, **({"tuned_contribution": t["contribution"], "tuned_ci_low": t["ci_low"],
                               "tuned_ci_high": t["ci_high"], "tuned_score": t["score"],
                               "tuned_rates": " ".join(f"{r:g}" for r in profiles["chosen"].get(str(row["layer"]), []))}
                            if t else {})})
    return out


def describe(profiles: dict) -> str:
    """One line: the full gain at the fixed and tuned rates, the rank agreement of the two profiles, and how
    often the grid chose each rate."""
    import warnings

    from scipy.stats import spearmanr

    fixed, tuned = profiles["profiles"].get(profiles["fixed"]), profiles["profiles"].get("tuned")
    if not fixed or not tuned:
        return "no full run at the fixed rate and at the tuned rates yet"
    gf, gt = profiles["full_gain"][profiles["fixed"]], profiles["full_gain"]["tuned"]
    with warnings.catch_warnings():  # a constant profile (or 2 layers) has no rank correlation: nan
        warnings.simplefilter("ignore")
        rho = spearmanr([r["contribution"] for r in fixed], [r["contribution"] for r in tuned]).statistic
    counts: dict[float, int] = {}
    for rates in profiles["chosen"].values():
        for r in rates:
            counts[r] = counts.get(r, 0) + 1
    picks = ", ".join(f"{r:g} x{n}" for r, n in sorted(counts.items()))
    best = lambda rows: max(rows, key=lambda r: r["contribution"])["layer"]  # noqa: E731
    return (f"full gain {gf['gain']:+.1%} at lr {profiles['fixed']:g}, {gt['gain']:+.1%} at tuned rates; "
            f"best layer {best(fixed)} (fixed) vs {best(tuned)} (tuned); Spearman of the two profiles {rho:+.2f}; "
            f"rates chosen: {picks}")
