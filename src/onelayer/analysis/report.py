"""Self-contained HTML report and PNG plots for a finished (or partial) sweep directory.

``build_report(out)`` reads only the results store:

- ``OUT/results.csv`` (one row per job), ``OUT/contributions.csv`` (one row per condition × layer),
- ``OUT/summary.json`` (full-RL gain and concentration per condition),
- ``OUT/jobs/<job_id>/metrics.jsonl`` and ``eval.json`` (learning curves),

and writes ``OUT/plots/{contribution_vs_depth,learning_curves,heatmap,rank_correlation}.png`` and
``OUT/report.html``. The HTML embeds the images as base64 data URIs and uses inline CSS only, so it
opens offline. Anything missing or empty is reported in the page instead of failing; a plot without
data is drawn as a placeholder that says what is missing. All files are written atomically.

The figures are drawn by ``onelayer.analysis.plots``; this module reads the store and assembles the page.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from onelayer.analysis.plots import (
    PLOTS,
    _fmt,
    _num,
    plot_contribution,
    plot_corr,
    plot_curves,
    plot_heatmap,
    plot_recipe_cost,
    plot_recipe_deltas,
)
from onelayer.io import atomic_write_bytes, slug

# ---------------------------------------------------------------- I/O helpers


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line of a killed job
    except OSError:
        pass
    return rows


def _load_curves(out: Path, results: list[dict]) -> list[dict]:
    """One entry per job with metrics: condition, layers, seed, steps, reward."""
    by_id = {r.get("job_id"): r for r in results}
    curves = []
    jobs = out / "jobs"
    if not jobs.is_dir():
        return curves
    for d in sorted(p for p in jobs.iterdir() if p.is_dir()):
        m = _read_metrics(d / "metrics.jsonl")
        pts = [(r["step"], r["reward_mean"]) for r in m if _finite(r.get("step")) and _finite(r.get("reward_mean"))]
        if not pts:
            continue
        ev = _read_json(d / "eval.json") or {}
        row = by_id.get(d.name, {})
        cond = row.get("condition") or "/".join(str(ev.get(k, "?")) for k in ("model", "task", "algo"))
        layers = str(ev.get("layers", row.get("layers", d.name)))
        seed = ev.get("seed", row.get("seed", ""))
        pts.sort()
        curves.append(
            {"job_id": d.name, "condition": cond, "layers": layers, "seed": str(seed),
             "steps": np.array([p[0] for p in pts], float), "reward": np.array([p[1] for p in pts], float)}
        )
    return curves


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _by_condition(contrib: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in contrib:
        groups.setdefault(r.get("condition", "?"), []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: _num(r.get("layer")))
    return groups


def _correlations(groups: dict[str, list[dict]]) -> tuple[dict | None, str | None]:
    if not groups:
        return None, "no contributions.csv: no profiles to correlate"
    from onelayer.analysis import contribution_profile, correlation_matrix

    profiles = {}
    for cond, rows in groups.items():
        clean = [{"relative_depth": _num(r.get("relative_depth")), "contribution": _num(r.get("contribution"))}
                 for r in rows]
        clean = [r for r in clean if math.isfinite(r["relative_depth"]) and math.isfinite(r["contribution"])]
        if len(clean) >= 2:
            profiles[cond] = contribution_profile(clean)
    if not profiles:
        return None, "no condition has two or more finite layer contributions"
    try:
        return correlation_matrix(profiles), None
    except Exception as e:  # a degenerate profile must not stop the report
        return None, f"rank correlation failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}
.noise{background:#fde2e1;color:#9b1c1c;border:1px solid #f5a5a0;padding:.1em .4em;font-weight:bold;border-radius:3px}
.ok{color:#1d6b2f}.missing{background:#fff7d6;border:1px solid #e8d48a;padding:.5em 1em}
.scroll{overflow-x:auto}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.card{border:1px solid #ddd;border-radius:4px;padding:.6em 1em;margin:.6em 0}
"""


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = cols or list(rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            v = "" if v is None else str(v)
            num = _num(v)
            shown = _fmt(v, 4) if (v and math.isfinite(num) and not v.lstrip("-").isdigit()) else v
            cls = "" if (v and math.isfinite(num)) else ' class="l"'
            cells.append(f"<td{cls}>{html.escape(shown)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _summary_html(summary: dict) -> str:
    if not summary:
        return '<p class="missing">summary.json is missing or empty.</p>'
    parts = []
    for cond, s in summary.items():
        s = s if isinstance(s, dict) else {}
        fg = s.get("full_gain") or {}
        co = s.get("concentration") or {}
        noise = bool(fg.get("noise"))
        flag = ('<span class="noise">NOISE: the full-RL gain CI includes 0; contributions are not meaningful</span>'
                if noise else '<span class="ok">full-RL gain is above noise</span>')
        parts.append(
            f'<div class="card"><h3>{html.escape(str(cond))}</h3>'
            f"<p>Full-RL gain: <b>{_fmt(fg.get('gain'))}</b> "
            f"(95 % CI {_fmt(fg.get('ci_low'))} … {_fmt(fg.get('ci_high'))}); "
            f"base {_fmt(fg.get('base_score'))} → full {_fmt(fg.get('full_score'))}. {flag}</p>"
            f"<p>Concentration: best layer <b>{html.escape(str(co.get('best_layer', '–')))}</b> "
            f"recovers {_fmt(co.get('best_recovery'), 2)} of the full gain; "
            f"{html.escape(str(co.get('n_layers_ge_0_8', '–')))} layer(s) with C ≥ 0.8; "
            f"top-3 share {_fmt(co.get('top3_share'), 2)}.</p></div>"
        )
    return "".join(parts)


def _lr_grid_html(grid: list[dict], summary: dict, plots: Path) -> str:
    """The learning-rate grid: C_l at the fixed rate and at the tuned rates, side by side."""
    h = ["<h2>Learning-rate grid</h2><p>Every layer set ran at every rate; per layer set and seed the tuned run is "
         "the rate whose held-out <i>train-split</i> check scored best (the eval split takes no part).</p>"]
    for cond, s in summary.items():
        info = s.get("lr_grid") if isinstance(s, dict) else None
        if not info:
            continue
        h.append(f"<p>{html.escape(cond)}: {html.escape(str(info.get('summary') or info.get('error')))}</p>")
        fixed = f"{float(info['fixed']):g}" if "fixed" in info else None
        groups = {f"{cond} @ lr {rate}" if rate != "tuned" else f"{cond} @ tuned rates":
                  [r for r in grid if r["condition"] == cond and r["rate"] == rate and r["layer"] != "full"]
                  for rate in (fixed, "tuned") if rate}
        b64 = base64.b64encode(plot_contribution(groups, plots / f"lr_grid_{slug(cond)}.png")).decode("ascii")
        h.append(f'<img alt="lr grid {html.escape(cond)}" src="data:image/png;base64,{b64}">')
    return "".join(h) + _table(grid)


def _corr_html(corr: dict | None, why: str | None) -> str:
    if corr is None:
        return f'<p class="missing">{html.escape(why or "no rank correlation")}</p>'
    names = corr["names"]
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            rows.append({"profile A": names[i], "profile B": names[j],
                         "Spearman ρ": corr["spearman"][i][j], "p (perm.)": corr["spearman_p"][i][j],
                         "Kendall τ": corr["kendall"][i][j], "p (perm.) ": corr["kendall_p"][i][j]})
    out = []
    if rows:
        out.append(_table(rows))
    else:
        out.append("<p>Only one condition: no pairwise correlations.</p>")
    out.append("<p>ρ of each profile with its own inverted-U (position-only) null:</p>")
    out.append(_table([{"condition": n, "null ρ": corr["null_rho"].get(n)} for n in names]))
    return "".join(out)


def build_report(out) -> Path:
    """Write OUT/plots/*.png and OUT/report.html from the results store; returns the HTML path."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []

    results = _read_csv(out / "results.csv")
    if not results:
        missing.append("results.csv (missing or empty)")
    contrib = _read_csv(out / "contributions.csv")
    if not contrib:
        missing.append("contributions.csv (missing or empty): no contribution plot, heatmap or correlations")
    summary = _read_json(out / "summary.json")
    if not isinstance(summary, dict) or not summary:
        summary = {}
        missing.append("summary.json (missing or empty)")
    curves = _load_curves(out, results)
    if not curves:
        missing.append("jobs/*/metrics.jsonl (none found): no learning curves")

    groups = _by_condition(contrib)
    corr, why = _correlations(groups)
    images = {
        "contribution_vs_depth": plot_contribution(groups, plots / "contribution_vs_depth.png"),
        "learning_curves": plot_curves(curves, plots / "learning_curves.png"),
        "heatmap": plot_heatmap(groups, plots / "heatmap.png"),
        "rank_correlation": plot_corr(corr, why, plots / "rank_correlation.png"),
    }
    captions = {
        "contribution_vs_depth": "Contribution vs depth (95 % CI; dashed 0 = base, dotted 1 = full RL)",
        "learning_curves": "Learning curves per layer set",
        "heatmap": "Layer × condition contribution",
        "rank_correlation": "Rank-correlation matrix",
    }

    conds = list(dict.fromkeys(list(summary) + list(groups) + [r.get("condition", "") for r in results if r.get("condition")]))
    h = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
         f"<title>onelayer report: {html.escape(out.name)}</title><style>{_CSS}</style></head><body>",
         f"<h1>onelayer sweep report</h1><p>Store: <code>{html.escape(str(out))}</code>; "
         f"{len(results)} job row(s); condition(s): {html.escape(', '.join(conds) or '–')}.</p>"]
    if missing:
        h.append('<div class="missing"><b>Missing from this store:</b><ul>'
                 + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul></div>")
    collapsed = [r["job_id"] for r in results if str(r.get("collapsed", "")).lower() == "true"]
    if collapsed:
        h.append('<div class="missing"><b>Collapsed runs</b> (the training reward fell apart; every contribution '
                 'computed from them is marked <code>collapsed</code>):<ul>'
                 + "".join(f"<li>{html.escape(j)}</li>" for j in collapsed) + "</ul></div>")
    h.append("<h2>Summary per condition</h2>" + _summary_html(summary))
    h.append("<h2>Plots</h2>")
    for name in PLOTS:
        b64 = base64.b64encode(images[name]).decode("ascii")
        h.append(f"<h3>{html.escape(captions[name])}</h3>"
                 f'<img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">')
    h.append("<h2>Rank correlation</h2>" + _corr_html(corr, why))
    pairs = _read_csv(out / "additivity.csv")
    if pairs:
        h.append("<h2>Additivity</h2><p>Interaction of each trained pair of layers, S<sub>ij</sub> − S<sub>i</sub> − "
                 "S<sub>j</sub> + S<sub>base</sub> (95 % CI over seeds and items); a CI without 0 means the two "
                 "layers' gains do not add up.</p>"
                 + "".join(f"<p>{html.escape(c)}: {html.escape(v['additivity']['summary'])}</p>"
                           for c, v in summary.items() if isinstance(v, dict) and "additivity" in v)
                 + _table(pairs))
    grid = _read_csv(out / "lr_grid.csv")
    if grid:
        h.append(_lr_grid_html(grid, summary, plots))
    recipes = _read_csv(out / "recipes.csv")
    if recipes:
        h.append("<h2>Recipes</h2><p>Each recipe against full RL (Δ with a CI paired over eval items; costs as ratios "
                 "to full RL, measured in the same sweep).</p>")
        for name, fn, caption in (("recipe_deltas", plot_recipe_deltas, "Δ vs full RL"),
                                  ("recipe_cost", plot_recipe_cost, "Score vs step time")):
            b64 = base64.b64encode(fn(recipes, plots / f"{name}.png")).decode("ascii")
            h.append(f"<h3>{caption}</h3>" f'<img alt="{name}" src="data:image/png;base64,{b64}">')
        h.append(_table(recipes))
    h.append("<h2>Numbers</h2><h3>contributions.csv</h3>")
    h.append(_table(contrib) if contrib else '<p class="missing">contributions.csv is missing or empty.</p>')
    h.append("<h3>results.csv</h3>")
    h.append(_table(results) if results else '<p class="missing">results.csv is missing or empty.</p>')
    h.append("</body></html>\n")
    path = out / "report.html"
    atomic_write_bytes(path, "\n".join(h).encode("utf-8"))
    return path
