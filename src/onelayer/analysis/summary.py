"""From a sweep directory to contributions.csv and summary.json (reads only the results store)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from onelayer.analysis.additivity import ADDITIVITY_COLUMNS, pair_interactions, verdict
from onelayer.analysis.contribution import concentration, full_gain_summary, group_by_condition, layer_contributions
from onelayer.analysis.lr_grid import LR_GRID_COLUMNS, describe, grid_rows, rate_profiles, side_by_side
from onelayer.io import atomic_write_json, atomic_write_text, read_json

CONTRIBUTION_COLUMNS = ["condition", "layer", "relative_depth", "contribution", "ci_low", "ci_high",
                        "score", "gain", "base_score", "full_score", "n_items", "n_seeds", "n_full_seeds", "collapsed",
                        "tuned_contribution", "tuned_ci_low", "tuned_ci_high", "tuned_score", "tuned_rates"]


def load_records(out: str | Path) -> list[dict]:
    """The eval.json of every finished job under OUT/jobs."""
    records = []
    for path in sorted(Path(out).glob("jobs/*/eval.json")):
        rec = json.loads(path.read_text())
        rec["job_id"] = path.parent.name
        if "learning_rate" not in rec and (path.parent / "config.json").is_file():  # jobs run before it was recorded
            rec["learning_rate"] = json.loads((path.parent / "config.json").read_text()).get("learning_rate")
        records.append(rec)
    return records


def fixed_rates(out: Path) -> dict[str, float]:
    """Condition -> the fixed learning rate of a sweep run with --lr-grid (empty for a one-rate sweep)."""
    plan = read_json(out / "plan.json") if (out / "plan.json").is_file() else {}
    if not (plan.get("spec") or {}).get("lr_grid"):
        return {}
    from onelayer.sweep.plan import make_spec, rate_settings

    spec = make_spec(plan["spec"])
    return {c: rate_settings(spec, *c.split("/"))[0] for c in sorted({j["condition"] for j in plan["jobs"]})}


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _warm_starts(runs: list[dict]) -> list[dict]:
    """The distinct warm-start checkpoints the condition's jobs started from (hash and held-out accuracy)."""
    seen = {}
    for r in runs:
        ws = r.get("warm_start")
        if ws:
            seen.setdefault(ws["hash"], {"hash": ws["hash"], "heldout_accuracy": ws["heldout_accuracy"], "jobs": 0})
            seen[ws["hash"]]["jobs"] += 1
    return list(seen.values())


def summarize(out: str | Path) -> dict:
    """Write OUT/contributions.csv and OUT/summary.json; returns the summary per condition."""
    out = Path(out)
    rows, summary, grid = [], {}, []
    records, fixed = load_records(out), fixed_rates(out)
    at_fixed = []  # the records of the fixed rate (all of them without a grid)
    for condition, runs in group_by_condition(records).items():
        profiles = None
        if condition in fixed:  # --lr-grid: the main profile is the fixed rate's, the tuned one beside it
            try:
                profiles = rate_profiles(runs, fixed[condition])
                grid += grid_rows(condition, profiles)
            except ValueError as exc:  # a grid still running: no tuned profile yet
                summary[condition] = {"lr_grid": {"error": str(exc)}}
            runs = [r for r in runs if r.get("learning_rate") in (None, fixed[condition]) or r["layers"] == "none"]
        at_fixed += runs
        if not any(r["layers"] == "all" for r in runs):
            summary[condition] = {"error": "no finished full-parameter run yet"}
            continue
        layer_rows = layer_contributions(runs)
        rows += [{"condition": condition, **r} for r in (side_by_side(layer_rows, profiles) if profiles else layer_rows)]
        if profiles:
            summary[condition] = {"lr_grid": {
                "fixed": profiles["fixed"], "rates": profiles["rates"], "chosen": profiles["chosen"],
                "tuned_full_gain": profiles["full_gain"].get("tuned"), "summary": describe(profiles)}}
        summary[condition] = {**summary.get(condition, {}), "full_gain": full_gain_summary(runs),
                              "concentration": concentration(layer_rows) if layer_rows else {},
                              # seeds of the single-layer runs (fewest over layers): what the C_l CIs cover
                              "layer_seeds": min((r["n_seeds"] for r in layer_rows), default=0),
                              "collapsed_jobs": sorted(r["job_id"] for r in runs if r.get("collapsed")),
                              "warm_starts": _warm_starts(runs)}
    _write_csv(out / "contributions.csv", CONTRIBUTION_COLUMNS, rows)
    if grid:
        _write_csv(out / "lr_grid.csv", LR_GRID_COLUMNS, grid)
    pairs = pair_interactions(at_fixed)
    if pairs:  # pairs of layers were trained (--pairs): do their gains add up?
        _write_csv(out / "additivity.csv", ADDITIVITY_COLUMNS, pairs)
        for condition, v in verdict(pairs).items():
            summary.setdefault(condition, {})["additivity"] = v
    atomic_write_json(out / "summary.json", summary)
    return summary
