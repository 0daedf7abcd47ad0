"""From a sweep directory to contributions.csv and summary.json (reads only the results store)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from onelayer.analysis.additivity import ADDITIVITY_COLUMNS, pair_interactions, verdict
from onelayer.analysis.contribution import concentration, full_gain_summary, group_by_condition, layer_contributions
from onelayer.io import atomic_write_json, atomic_write_text

CONTRIBUTION_COLUMNS = ["condition", "layer", "relative_depth", "contribution", "ci_low", "ci_high",
                        "score", "gain", "base_score", "full_score", "n_items", "n_seeds", "n_full_seeds", "collapsed"]


def load_records(out: str | Path) -> list[dict]:
    """The eval.json of every finished job under OUT/jobs."""
    records = []
    for path in sorted(Path(out).glob("jobs/*/eval.json")):
        rec = json.loads(path.read_text())
        rec["job_id"] = path.parent.name
        records.append(rec)
    return records


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
    rows, summary = [], {}
    records = load_records(out)
    for condition, runs in group_by_condition(records).items():
        if not any(r["layers"] == "all" for r in runs):
            summary[condition] = {"error": "no finished full-parameter run yet"}
            continue
        layer_rows = layer_contributions(runs)
        rows += [{"condition": condition, **r} for r in layer_rows]
        summary[condition] = {"full_gain": full_gain_summary(runs),
                              "concentration": concentration(layer_rows) if layer_rows else {},
                              # seeds of the single-layer runs (fewest over layers): what the C_l CIs cover
                              "layer_seeds": min((r["n_seeds"] for r in layer_rows), default=0),
                              "collapsed_jobs": sorted(r["job_id"] for r in runs if r.get("collapsed")),
                              "warm_starts": _warm_starts(runs)}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CONTRIBUTION_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "contributions.csv", buf.getvalue())
    pairs = pair_interactions(records)
    if pairs:  # pairs of layers were trained (--pairs): do their gains add up?
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=ADDITIVITY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(pairs)
        atomic_write_text(out / "additivity.csv", buf.getvalue())
        for condition, v in verdict(pairs).items():
            summary.setdefault(condition, {})["additivity"] = v
    atomic_write_json(out / "summary.json", summary)
    return summary
