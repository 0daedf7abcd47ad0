"""Self-contained HTML report and PNG plots for a finished (or partial) sweep directory.

``build_report(out)`` reads only the results store:

- ``OUT/results.csv`` (one row per job), ``OUT/contributions.csv`` (one row per condition × layer),
- ``OUT/summary.json`` (full-RL gain and concentration per condition),
- ``OUT/jobs/<job_id>/metrics.jsonl`` and ``eval.json`` (learning curves),

and writes ``OUT/plots/{contribution_vs_depth,learning_curves,heatmap,rank_correlation}.png`` and
``OUT/report.html``. The HTML embeds the images as base64 data URIs and uses inline CSS only, so it
opens offline. Anything missing or empty is reported in the page instead of failing; a plot without
data is drawn as a placeholder that says what is missing. All files are written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from onelayer.io import atomic_write_bytes  # noqa: E402

PLOTS = ("contribution_vs_depth", "learning_curves", "heatmap", "rank_correlation")
_SMOOTH = 5  # moving-average window (steps) for learning curves


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


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _fmt(x, nd: int = 3) -> str:
    v = _num(x)
    if math.isnan(v):
        return "–" if x in (None, "") else str(x)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{nd}f}"


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


def _layer_sort_key(layers: str):
    order = {"none": (-2, 0), "all": (-1, 0)}
    if layers in order:
        return order[layers]
    try:
        return (0, int(layers))
    except ValueError:
        return (1, layers)


# ---------------------------------------------------------------- plots


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data


def _by_condition(contrib: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in contrib:
        groups.setdefault(r.get("condition", "?"), []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: _num(r.get("layer")))
    return groups


def _plot_contribution(groups: dict[str, list[dict]], path: Path) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if not groups:
        _placeholder(ax, "no contributions.csv: contribution vs depth not available")
        ax.set_title("Layer contribution vs depth")
        return _save(fig, path)
    n = len(groups)
    width = 0.6 / max(n, 1)
    all_layers = set()
    for i, (cond, rows) in enumerate(groups.items()):
        x = np.array([_num(r.get("layer")) for r in rows])
        y = np.array([_num(r.get("contribution")) for r in rows])
        lo = np.array([_num(r.get("ci_low")) for r in rows])
        hi = np.array([_num(r.get("ci_high")) for r in rows])
        yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        yerr = np.nan_to_num(yerr)
        off = (i - (n - 1) / 2) * width
        ax.errorbar(x + off, y, yerr=yerr, fmt="o-", capsize=3, label=cond)
        all_layers.update(int(v) for v in x if math.isfinite(v))
    ax.axhline(0, color="grey", ls="--", lw=1)
    ax.axhline(1, color="black", ls=":", lw=1)
    xmax = ax.get_xlim()[1]
    ax.text(xmax, 0, " base (0)", va="center", ha="left", fontsize=8, color="grey")
    ax.text(xmax, 1, " full RL (1)", va="center", ha="left", fontsize=8)
    # x ticks: layer index with relative depth underneath
    depth = {}
    for rows in groups.values():
        for r in rows:
            if math.isfinite(_num(r.get("layer"))):
                depth.setdefault(int(_num(r["layer"])), _num(r.get("relative_depth")))
    ticks = sorted(all_layers)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}\n({depth.get(t, float('nan')):.2f})" for t in ticks], fontsize=8)
    ax.set_xlabel("layer index (relative depth)")
    ax.set_ylabel("contribution C = (S_l − S_base)/(S_full − S_base)")
    ax.set_title("Layer contribution vs depth (95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    if len(y) < 2 or w <= 1:
        return y
    w = min(w, len(y))
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):  # trailing window, shorter at the start
        j = max(0, i - w + 1)
        out[i] = (c[i + 1] - c[j]) / (i + 1 - j)
    return out


def _plot_curves(curves: list[dict], path: Path) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if not curves:
        _placeholder(ax, "no jobs/*/metrics.jsonl: learning curves not available")
        ax.set_title("Learning curves")
        return _save(fig, path)
    multi_cond = len({c["condition"] for c in curves}) > 1
    multi_seed = len({c["seed"] for c in curves}) > 1
    curves = sorted(curves, key=lambda c: (c["condition"], _layer_sort_key(c["layers"]), c["seed"]))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, c in enumerate(curves):
        label = f"layers={c['layers']}"
        if multi_seed:
            label += f" s{c['seed']}"
        if multi_cond:
            label = f"{c['condition']} {label}"
        style = "--" if c["layers"] == "all" else "-"
        lw = 2.2 if c["layers"] == "all" else 1.3
        ax.plot(c["steps"], _moving_average(c["reward"], _SMOOTH), style, lw=lw, label=label, color=cmap(i % cmap.N))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(f"reward_mean (moving average, {_SMOOTH} steps)")
    ax.set_title("Learning curves per layer set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _plot_heatmap(groups: dict[str, list[dict]], path: Path) -> bytes:
    conds = list(groups)
    layers = sorted({int(_num(r.get("layer"))) for rows in groups.values() for r in rows
                     if math.isfinite(_num(r.get("layer")))})
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(conds) + 3), max(3.5, 0.45 * len(layers) + 1.5)))
    if not conds or not layers:
        _placeholder(ax, "no contributions.csv: heatmap not available")
        ax.set_title("Layer × condition contribution")
        return _save(fig, path)
    M = np.full((len(layers), len(conds)), np.nan)
    for j, cond in enumerate(conds):
        for r in groups[cond]:
            li = _num(r.get("layer"))
            if math.isfinite(li) and int(li) in layers:
                M[layers.index(int(li)), j] = _num(r.get("contribution"))
    finite = M[np.isfinite(M)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax)
    im = ax.imshow(np.ma.masked_invalid(M), cmap="RdBu_r", norm=norm, aspect="auto")
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            txt = "–" if not math.isfinite(v) else f"{v:.2f}"
            color = "white" if math.isfinite(v) and abs(v) > 0.6 * vmax else "black"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels(conds, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers])
    ax.set_xlabel("condition")
    ax.set_ylabel("layer")
    ax.set_title("Layer × condition contribution (0 = base, 1 = full RL)")
    fig.colorbar(im, ax=ax, label="contribution")
    return _save(fig, path)


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


def _plot_corr(corr: dict | None, why: str | None, path: Path) -> bytes:
    if corr is None:
        fig, ax = plt.subplots(figsize=(5, 4))
        _placeholder(ax, why or "no rank correlation")
        ax.set_title("Rank correlation (Spearman ρ)")
        return _save(fig, path)
    names = corr["names"]
    M = np.array(corr["spearman"], float)
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * k + 2.5), max(3.8, 1.1 * k + 2)))
    im = ax.imshow(M, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(k):
        for j in range(k):
            v = M[i, j]
            ax.text(j, i, "–" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=9, color="white" if math.isfinite(v) and abs(v) > 0.6 else "black")
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(k))
    ax.set_yticklabels(names, fontsize=8)
    title = "Rank correlation of contribution profiles (Spearman ρ)"
    if k == 1:
        title += f"\ninverted-U null ρ = {_fmt(corr['null_rho'].get(names[0]), 2)}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="Spearman ρ")
    return _save(fig, path)


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
        "contribution_vs_depth": _plot_contribution(groups, plots / "contribution_vs_depth.png"),
        "learning_curves": _plot_curves(curves, plots / "learning_curves.png"),
        "heatmap": _plot_heatmap(groups, plots / "heatmap.png"),
        "rank_correlation": _plot_corr(corr, why, plots / "rank_correlation.png"),
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
    h.append("<h2>Numbers</h2><h3>contributions.csv</h3>")
    h.append(_table(contrib) if contrib else '<p class="missing">contributions.csv is missing or empty.</p>')
    h.append("<h3>results.csv</h3>")
    h.append(_table(results) if results else '<p class="missing">results.csv is missing or empty.</p>')
    h.append("</body></html>\n")
    path = out / "report.html"
    atomic_write_bytes(path, "\n".join(h).encode("utf-8"))
    return path
