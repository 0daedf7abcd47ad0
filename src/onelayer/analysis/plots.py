"""PNG plots of a sweep's results: contribution vs depth, learning curves, layer × condition heatmap,
rank-correlation matrix.

Each ``plot_*`` function draws one figure from rows already read from the results store, writes it
atomically as a PNG and returns its bytes (for embedding in the HTML report). A plot without data is
drawn as a placeholder that says what is missing.
"""

from __future__ import annotations

import io
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


def _num(x) -> float:
    """A CSV cell as a float; NaN when it is not a number."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _fmt(x, nd: int = 3) -> str:
    """A cell for display: nd decimals, ∞ signs, '–' for an empty cell, other text unchanged."""
    v = _num(x)
    if math.isnan(v):
        return "–" if x in (None, "") else str(x)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{nd}f}"


def _layer_sort_key(layers: str):
    order = {"none": (-2, 0), "all": (-1, 0)}
    if layers in order:
        return order[layers]
    try:
        return (0, int(layers))
    except ValueError:
        return (1, layers)


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


def plot_contribution(groups: dict[str, list[dict]], path: Path) -> bytes:
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


def plot_curves(curves: list[dict], path: Path) -> bytes:
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


def plot_heatmap(groups: dict[str, list[dict]], path: Path) -> bytes:
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
    ax.set_yticklabels([str(layer) for layer in layers])
    ax.set_xlabel("condition")
    ax.set_ylabel("layer")
    ax.set_title("Layer × condition contribution (0 = base, 1 = full RL)")
    fig.colorbar(im, ax=ax, label="contribution")
    return _save(fig, path)


def plot_corr(corr: dict | None, why: str | None, path: Path) -> bytes:
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


def plot_recipe_deltas(rows: list[dict], path: Path) -> bytes:
    """Δ vs full RL per recipe with its paired 95 % CI (recipes.csv rows)."""
    rows = [r for r in rows if r.get("recipe") != "full" and _num(r.get("delta_vs_full")) == _num(r.get("delta_vs_full"))]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    if not rows:
        _placeholder(ax, "no recipe with a full-RL reference")
        return _save(fig, path)
    y = np.arange(len(rows))
    d = np.array([_num(r["delta_vs_full"]) for r in rows])
    err = np.array([[d[i] - _num(r["delta_ci_low"]), _num(r["delta_ci_high"]) - d[i]] for i, r in enumerate(rows)]).T
    ax.barh(y, d, xerr=err, color=["C2" if lo > 0 else "C3" if hi < 0 else "C7" for lo, hi in
                                   ((_num(r["delta_ci_low"]), _num(r["delta_ci_high"])) for r in rows)], capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [r["recipe"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("score − full RL (paired 95 % CI)")
    return _save(fig, path)


def plot_recipe_cost(rows: list[dict], path: Path) -> bytes:
    """Score vs measured step time (as a ratio to full RL) per recipe."""
    rows = [r for r in rows if _num(r.get("step_time_ratio")) == _num(r.get("step_time_ratio"))]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    if not rows:
        _placeholder(ax, "no recipe with a full-RL reference")
        return _save(fig, path)
    for r in rows:
        x, s = _num(r["step_time_ratio"]), _num(r["score"])
        ax.errorbar(x, s, yerr=[[s - _num(r["ci_low"])], [_num(r["ci_high"]) - s]], fmt="o", capsize=3)
        ax.annotate(r["recipe"], (x, s), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("step time / full RL's")
    ax.set_ylabel("eval score (95 % CI over items and seeds)")
    return _save(fig, path)
