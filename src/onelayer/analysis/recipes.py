"""The recipes table: one row per layer-aware recipe, its score and Δ vs full RL with CIs, and its cost.

Scores are per eval item and per seed (`eval.json` item_scores). A recipe's score CI resamples seeds and
items; its Δ vs full is paired over items (resampled jointly, so item difficulty cancels), each side's
seeds resampled on their own. Costs come from the jobs' own records: trainable parameters (`eval.json`),
optimizer-state bytes and the median step time (`metrics.jsonl`), and wall time (`eval.json`
wall_seconds, summed over seeds); each also as a ratio to full.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from onelayer.io import atomic_write_text, read_json, read_jsonl
from onelayer.stats import paired_seed_item_bootstrap_ci, seed_item_bootstrap_ci

RECIPE_COLUMNS = ["recipe", "kind", "k", "layers", "layer_lr", "n_seeds", "n_items", "score", "ci_low", "ci_high",
                  "delta_vs_full", "delta_ci_low", "delta_ci_high", "trainable_params", "trainable_ratio",
                  "optimizer_bytes", "optimizer_ratio", "step_seconds", "step_time_ratio", "wall_seconds",
                  "wall_ratio", "collapsed_seeds"]


def _runs(out: Path, job_ids: list[str]) -> list[dict]:
    """The finished jobs among `job_ids`: their eval record plus step time and optimizer bytes."""
    runs = []
    for job_id in job_ids:
        path = out / "jobs" / job_id
        if not (path / "eval.json").is_file():
            continue
        ev = read_json(path / "eval.json")
        metrics = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
        runs.append({"eval": ev, "step_seconds": statistics.median(m["seconds"] for m in metrics) if metrics else float("nan"),
                     "optimizer_bytes": metrics[-1].get("optimizer_bytes", 0) if metrics else 0})
    return runs


def recipes_table(out: str | Path, recipes, job_recipe: dict[str, str]) -> list[dict]:
    """Write OUT/recipes.csv (one row per recipe with at least one finished seed) and return its rows.
    `recipes`: `sweep.recipes.Recipe`s (full first); `job_recipe`: job id -> recipe name."""
    out = Path(out)
    by_recipe = {r.name: _runs(out, [j for j, name in job_recipe.items() if name == r.name]) for r in recipes}
    full = by_recipe.get("full") or []
    full_scores = [run["eval"]["item_scores"] for run in full]
    ref = {}
    if full:
        ref = {"trainable_params": full[0]["eval"]["trainable_params"],
               "optimizer_bytes": statistics.median(r["optimizer_bytes"] for r in full),
               "step_seconds": statistics.median(r["step_seconds"] for r in full),
               "wall_seconds": statistics.mean(r["eval"]["wall_seconds"] for r in full)}
    rows = []
    for recipe in recipes:
        runs = by_recipe[recipe.name]
        if not runs:
            continue
        scores = [run["eval"]["item_scores"] for run in runs]
        mean = sum(map(sum, scores)) / sum(map(len, scores))
        row = {"recipe": recipe.name, "kind": recipe.kind, "k": recipe.k or "", "layers": recipe.layers,
               "layer_lr": " ".join(f"{s}={m:g}" for s, m in recipe.layer_lr.items()), "n_seeds": len(runs),
               "n_items": len(scores[0]), "score": mean, **dict(zip(("ci_low", "ci_high"), seed_item_bootstrap_ci(scores))),
               "trainable_params": runs[0]["eval"]["trainable_params"],
               "optimizer_bytes": statistics.median(r["optimizer_bytes"] for r in runs),
               "step_seconds": statistics.median(r["step_seconds"] for r in runs),
               "wall_seconds": statistics.mean(r["eval"]["wall_seconds"] for r in runs),
               "collapsed_seeds": sum(bool(r["eval"].get("collapsed")) for r in runs)}
        if full_scores:
            full_mean = sum(map(sum, full_scores)) / sum(map(len, full_scores))
            lo, hi = paired_seed_item_bootstrap_ci(scores, full_scores)
            row.update(delta_vs_full=mean - full_mean, delta_ci_low=lo, delta_ci_high=hi)
            for key, ratio in (("trainable_params", "trainable_ratio"), ("optimizer_bytes", "optimizer_ratio"),
                               ("step_seconds", "step_time_ratio"), ("wall_seconds", "wall_ratio")):
                row[ratio] = row[key] / ref[key] if ref[key] else float("nan")
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RECIPE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "recipes.csv", buf.getvalue())
    return rows


def format_recipes(rows: list[dict]) -> str:
    """A plain-text table of recipes.csv rows."""
    lines = [f"{'recipe':<16} {'seeds':>5} {'score':>6} {'Δ vs full [95% CI]':<26} {'params':>7} {'optim':>6} "
             f"{'step':>6} {'wall':>6}"]
    for r in rows:
        delta = (f"{r['delta_vs_full']:+.3f} [{r['delta_ci_low']:+.3f}, {r['delta_ci_high']:+.3f}]"
                 if "delta_vs_full" in r else "")
        ratios = "".join(f" {r[k]:>6.2f}" if k in r else "" for k in
                         ("trainable_ratio", "optimizer_ratio", "step_time_ratio", "wall_ratio"))
        lines.append(f"{r['recipe']:<16} {r['n_seeds']:>5} {r['score']:>6.3f} {delta:<26}{ratios}")
    return "\n".join(lines)
