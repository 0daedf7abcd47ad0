"""Rank stability of contribution profiles: Spearman ρ / Kendall τ with permutation p-values,
interpolation on relative depth, and a position-only "inverted U" null.

A profile is ``{relative_depth: value}``, a ``(depths, values)`` pair, or (for two profiles already
on the same layers) a plain array of values. Profiles with different depths (e.g. an 8-layer and a
12-layer model) are compared on the depths of the profile with FEWER points: the finer profile is
linearly interpolated onto the coarser grid. Interpolating both onto the union of depths would
invent points and so shrink p-values; the coarser grid keeps n equal to the real number of
independent layers on one side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

N_PERM = 2000
_TIE_DECIMALS = 9  # values equal to 1e-9 of the profile's scale count as ties (float noise is not a rank)


def interpolate_profile(depths: Sequence[float], values: Sequence[float], grid: Sequence[float]) -> np.ndarray:
    """Linear interpolation of a profile onto ``grid`` (relative depths); constant beyond the ends.
    Non-finite values are dropped first."""
    d, v = np.asarray(depths, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(d) & np.isfinite(v)
    d, v = d[keep], v[keep]
    if d.size == 0:
        return np.full(len(grid), np.nan)
    order = np.argsort(d, kind="stable")
    return np.interp(np.asarray(grid, dtype=float), d[order], v[order])


def _as_profile(p) -> tuple[np.ndarray, np.ndarray] | None:
    """(depths, values) for a dict or a (depths, values) pair; None for a plain value array."""
    if isinstance(p, Mapping):
        items = sorted((float(k), float(v)) for k, v in p.items())
        return np.array([k for k, _ in items]), np.array([v for _, v in items])
    if isinstance(p, tuple) and len(p) == 2 and all(np.ndim(x) == 1 for x in p):
        d, v = np.asarray(p[0], dtype=float), np.asarray(p[1], dtype=float)
        if d.shape != v.shape:
            raise ValueError(f"profile has {d.size} depths but {v.size} values")
        order = np.argsort(d, kind="stable")
        return d[order], v[order]
    return None


def align_profiles(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Two value arrays on a common set of layers (see the module docstring for the grid rule)."""
    pa, pb = _as_profile(a), _as_profile(b)
    if pa is None and pb is None:
        x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if x.shape != y.shape:
            raise ValueError(f"aligned arrays differ in length ({x.size} vs {y.size}); "
                             "pass {depth: value} dicts or (depths, values) pairs to interpolate")
        return x, y
    if pa is None or pb is None:
        raise ValueError("pass both profiles the same way: both dicts / (depths, values) pairs, or both arrays")
    (da, va), (db, vb) = pa, pb
    if da.shape == db.shape and np.allclose(da, db, atol=1e-9):
        return va, vb
    if len(da) <= len(db):
        return va, interpolate_profile(db, vb, da)
    return interpolate_profile(da, va, db), vb


def _tidy(x: np.ndarray) -> np.ndarray:
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return x
    return np.round(x / scale, _TIE_DECIMALS) * scale


def rank_correlation(a, b, *, n_perm: int = N_PERM, seed: int = 0) -> dict:
    """Spearman ρ and Kendall τ-b between two profiles, with two-sided permutation p-values.

    p = (1 + #{|r_perm| ≥ |r_obs|}) / (1 + n_perm), permuting one profile's values over layers.
    Layers where either profile is nan are dropped. Returns ``spearman``, ``spearman_p``, ``kendall``,
    ``kendall_p``, ``n`` (layers compared); coefficients and p-values are nan when either profile is
    constant or fewer than 2 layers remain.
    """
    x, y = align_profiles(a, b)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = _tidy(x[keep]), _tidy(y[keep])
    n = int(x.size)
    nan = float("nan")
    out = {"spearman": nan, "spearman_p": nan, "kendall": nan, "kendall_p": nan, "n": n}
    if n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rho = float(stats.spearmanr(x, y).statistic)
    tau = float(stats.kendalltau(x, y).statistic)  # tau-b, same ties handling as below
    out.update(spearman=rho, kendall=tau)
    if n_perm <= 0:
        return out

    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)  # (n_perm, n)

    # Spearman = Pearson on average ranks; permuting y permutes its ranks
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    cx, cy = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(cx @ cx) * float(cy @ cy))
    rho_obs = float(cx @ cy) / norm
    rho_perm = (cy[perms] @ cx) / norm

    # Kendall tau-b = Σ sign(dx)·sign(dy) / sqrt(#untied-x pairs · #untied-y pairs); tie counts are
    # invariant under permutation, so only the numerator changes
    i, j = np.triu_indices(n, k=1)
    sx = np.sign(x[i] - x[j])
    sy_mat = np.sign(y[:, None] - y[None, :])
    denom = math.sqrt(float(np.count_nonzero(sx)) * float(np.count_nonzero(sy_mat[i, j])))
    tau_obs = float(sx @ sy_mat[i, j]) / denom
    tau_perm = (sy_mat[perms[:, i], perms[:, j]] @ sx) / denom

    tol = 1e-12
    out["spearman_p"] = float((1 + np.count_nonzero(np.abs(rho_perm) >= abs(rho_obs) - tol)) / (1 + n_perm))
    out["kendall_p"] = float((1 + np.count_nonzero(np.abs(tau_perm) >= abs(tau_obs) - tol)) / (1 + n_perm))
    return out


def inverted_u_null(depths: Sequence[float], values: Sequence[float]) -> dict:
    """Fit the position-only null a + b·d + c·d² with c ≤ 0 (least squares over relative depth d).

    The constrained problem is convex, so when the unconstrained fit has c > 0 the optimum lies on
    c = 0 and is the best straight line. ``rho_null`` is the Spearman ρ between the profile and the
    fitted null: high for any middle-heavy profile, so a cross-profile ρ near ``rho_null`` says
    little beyond "both peak mid-stack". Returns ``a``, ``b``, ``c``, ``rho_null``, ``peak_depth``
    (−b/2c, nan for a line), ``r2``, ``fitted``.
    """
    d, v = np.asarray(depths, dtype=float), np.asarray(values, dtype=float)
    if d.shape != v.shape:
        raise ValueError(f"{d.size} depths but {v.size} values")
    keep = np.isfinite(d) & np.isfinite(v)
    d, v = d[keep], v[keep]
    nan = float("nan")
    if d.size == 0:
        return {"a": nan, "b": nan, "c": nan, "rho_null": nan, "peak_depth": nan, "r2": nan, "fitted": []}
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(d), d, d * d], axis=1), v, rcond=None)
    a, b, c = (float(t) for t in coef)
    if c > 0:
        (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(d), d], axis=1), v, rcond=None)
        a, b, c = float(a), float(b), 0.0
    fitted = a + b * d + c * d * d
    ss_tot = float(((v - v.mean()) ** 2).sum())
    r2 = 1.0 - float(((v - fitted) ** 2).sum()) / ss_tot if ss_tot > 0 else nan
    x, y = _tidy(v), _tidy(fitted)
    rho = float(stats.spearmanr(x, y).statistic) if d.size >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else nan
    return {"a": a, "b": b, "c": c, "rho_null": rho, "peak_depth": -b / (2 * c) if c < 0 else nan,
            "r2": r2, "fitted": [float(t) for t in fitted]}


def correlation_matrix(profiles: Mapping[str, object], **kw) -> dict:
    """Pairwise ``rank_correlation`` of named profiles (each ``(depths, values)`` or ``{depth: value}``).

    Returns ``names`` and, as nested lists in ``names`` order, ``spearman``, ``kendall``,
    ``spearman_p``, ``kendall_p`` (diagonal: coefficient 1.0, p-value nan); ``null_rho``
    (name → ρ with the profile's own inverted-U null) and ``null`` (name → full ``inverted_u_null``).
    ``kw`` goes to ``rank_correlation`` (``n_perm``, ``seed``).
    """
    names = list(profiles)
    parsed = {}
    for name in names:
        p = _as_profile(profiles[name])
        if p is None:
            raise ValueError(f"profile {name!r}: give (depths, values) or {{depth: value}}")
        parsed[name] = p
    k = len(names)
    keys = ("spearman", "kendall", "spearman_p", "kendall_p")
    mats = {key: [[float("nan")] * k for _ in range(k)] for key in keys}
    for i in range(k):
        mats["spearman"][i][i] = mats["kendall"][i][i] = 1.0
        for j in range(i + 1, k):
            r = rank_correlation(parsed[names[i]], parsed[names[j]], **kw)
            for key in keys:
                mats[key][i][j] = mats[key][j][i] = r[key]
    null = {name: inverted_u_null(*parsed[name]) for name in names}
    return {"names": names, **mats, "null_rho": {n: null[n]["rho_null"] for n in names}, "null": null}
