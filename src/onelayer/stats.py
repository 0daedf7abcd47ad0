"""Bootstrap confidence intervals for eval scores and paired gains (seeded, so reruns agree)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 2000


def bootstrap_ci(scores: Sequence[float], *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of the mean of per-item scores."""
    x = np.asarray(scores, dtype=float)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def paired_bootstrap_ci(after: Sequence[float], before: Sequence[float], **kw) -> list[float]:
    """CI of mean(after − before) resampling eval items jointly, so item difficulty cancels."""
    a, b = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same eval items: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, **kw)
