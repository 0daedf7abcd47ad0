"""Layer contributions C_l = (S_l − S_base) / (S_full − S_base) from eval records, with bootstrap CIs.

Inputs are plain eval records (the dicts in each job's ``eval.json``) for one condition
(model, task, algo), possibly several seeds. A record is the base run when ``layers == "none"``,
the full-parameter run when ``layers == "all"``, and a single-layer run when ``layer_indices`` holds
exactly one block; other layer sets (pairs, top-k, middle-k) are ignored here.

CIs are percentile bootstraps over eval items, resampled jointly for the base, full and layer runs
(paired: every run scored the same item ids, so item difficulty cancels), and over seeds when there
are several (the same seed draw for base, full and layer, since they share the seed's base model).
The denominator S_full − S_base uses every seed with a full run, the numerator S_l − S_base the seeds
with that layer's run: a sweep that runs the full job on more seeds than the single layers (as the
default sweep does) gets C_l CIs that cover the full run's seed-to-seed variation; when the seed sets
differ, the two are resampled independently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def contribution(s_layer: float, s_base: float, s_full: float) -> float:
    """C = (S_layer − S_base) / (S_full − S_base); nan when full and base score the same."""
    denom = s_full - s_base
    if denom == 0 or not math.isfinite(denom):
        return float("nan")
    return (s_layer - s_base) / denom


def group_by_condition(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Split eval records by condition ``"model/task/algo"`` (the unit ``layer_contributions`` takes)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(condition_key(r), []).append(r)
    return groups


def condition_key(record: dict) -> str:
    return "/".join(str(record.get(k)) for k in ("model", "task", "algo"))


# --------------------------------------------------------------------------- collecting runs

def run_kind(run: dict) -> tuple[str, int | None]:
    """('base'|'full'|'layer'|'other', layer index or None)."""
    spec = str(run.get("layers", "")).strip().lower()
    idx = run.get("layer_indices")
    if spec == "none" or (spec != "all" and idx is not None and len(idx) == 0):
        return "base", None
    if spec == "all":
        return "full", None
    if idx is not None and len(idx) == 1:
        return "layer", int(idx[0])
    return "other", None


def _describe(run: dict) -> str:
    return f"run (layers={run.get('layers')!r}, seed={run.get('seed')!r})"


def _seed_order(seeds: Iterable) -> list:
    return sorted(set(seeds), key=lambda s: (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s)))


class _Runs:
    """Per-seed item-score arrays, aligned on one list of item ids."""

    def __init__(self, runs: Sequence[dict]):
        runs = list(runs)
        if not runs:
            raise ValueError("no eval records given")
        conditions = {condition_key(r) for r in runs}
        if len(conditions) > 1:
            raise ValueError(f"records from several conditions given ({sorted(conditions)}); "
                             "split them with group_by_condition first")
        self.ids: list[str] | None = None
        self._ref = ""
        self.base: dict = {}      # seed -> item array
        self.full: dict = {}
        self.layers: dict[int, dict] = {}
        self.num_layers: int | None = None
        self.collapsed: set = set()  # (kind, layer, seed) of runs whose collapse guard fired
        fallback_base: dict = {}
        for run in runs:
            kind, layer = run_kind(run)
            if kind == "other":
                continue
            seed = run.get("seed")
            if run.get("collapsed"):
                self.collapsed.add((kind, layer, seed))
            scores = self._aligned(run, "item_scores")
            L = run.get("num_layers")
            if L is not None:
                if self.num_layers is not None and int(L) != self.num_layers:
                    raise ValueError(f"{_describe(run)} has num_layers={L}, others have {self.num_layers}")
                self.num_layers = int(L)
            if kind == "base":
                self._put(self.base, seed, scores, run)
            elif kind == "full":
                self._put(self.full, seed, scores, run)
            else:
                self._put(self.layers.setdefault(layer, {}), seed, scores, run)
            if kind != "base" and run.get("base_item_scores") is not None and seed not in fallback_base:
                fallback_base[seed] = self._aligned(run, "base_item_scores")
        # a seed without its own base run still has the base scores every trained run records
        for seed, arr in fallback_base.items():
            self.base.setdefault(seed, arr)
        if not self.full:
            raise ValueError("no full-parameter run (layers='all') among the records: C_l needs S_full")
        if not self.base:
            raise ValueError("no base scores (a layers='none' run or base_item_scores) among the records")
        if self.num_layers is None:
            self.num_layers = max(self.layers) + 1 if self.layers else 1
        self.n_items = len(self.ids)
        if self.n_items == 0:
            raise ValueError("eval records have no items (item_ids is empty)")

    def _aligned(self, run: dict, key: str) -> np.ndarray:
        ids, scores = run.get("item_ids"), run.get(key)
        if ids is None or scores is None:
            raise ValueError(f"{_describe(run)} lacks per-item scores ('item_ids' / {key!r}); "
                             "contributions need them for the paired bootstrap")
        ids = [str(i) for i in ids]
        scores = np.asarray(scores, dtype=float)
        if len(ids) != len(scores):
            raise ValueError(f"{_describe(run)}: {len(ids)} item_ids but {len(scores)} {key}")
        if self.ids is None:
            if len(set(ids)) != len(ids):
                raise ValueError(f"{_describe(run)} has duplicate item_ids")
            self.ids, self._ref = ids, _describe(run)
            self._pos = {i: k for k, i in enumerate(ids)}
            return scores
        if ids == self.ids:
            return scores
        if len(ids) == len(self.ids) and set(ids) == set(self.ids) and len(set(ids)) == len(ids):
            order = np.empty(len(ids), dtype=int)
            for k, i in enumerate(ids):
                order[self._pos[i]] = k
            return scores[order]
        missing = sorted(set(self.ids) - set(ids))[:3]
        extra = sorted(set(ids) - set(self.ids))[:3]
        raise ValueError(f"{_describe(run)} was scored on different eval items than {self._ref} "
                         f"({len(ids)} vs {len(self.ids)} items; missing e.g. {missing}, extra e.g. {extra}); "
                         "contributions compare runs on the same items")

    @staticmethod
    def _put(table: dict, seed, scores: np.ndarray, run: dict) -> None:
        if seed in table:
            raise ValueError(f"two records for the same {_describe(run)}")
        table[seed] = scores


# --------------------------------------------------------------------------- bootstrap machinery

def _item_counts(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items) multiplicities of a with-replacement item resample; row b sums to n_items."""
    idx = rng.integers(0, n_items, size=(n_boot, n_items))
    flat = (idx + (np.arange(n_boot) * n_items)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_items).reshape(n_boot, n_items).astype(float)


def _seed_weights(k: int, n_boot: int, seed: int, key: tuple) -> np.ndarray:
    """(n_boot, k) seed-resample weights (multiplicity / k); a column of ones when there is one seed."""
    if k == 1:
        return np.ones((n_boot, 1))
    rng = np.random.default_rng([seed, 7919, *key])
    idx = rng.integers(0, k, size=(n_boot, k))
    counts = np.zeros((n_boot, k))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts / k


def _ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ratio(num: np.ndarray, denom: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / denom
    return np.where(denom == 0, np.nan, out)


class _Boot:
    """Bootstrap means of per-seed item arrays, sharing one item resample across all runs."""

    def __init__(self, data: _Runs, n_boot: int, seed: int):
        self.data, self.n_boot, self.seed = data, n_boot, seed
        self.seeds = _seed_order(set(data.base) | set(data.full) | {s for t in data.layers.values() for s in t})
        self.W = _item_counts(data.n_items, n_boot, np.random.default_rng(seed)) / data.n_items
        self._cache: dict = {}

    def boot_means(self, table: dict, seeds: list) -> np.ndarray:
        """(n_boot,) bootstrap of the seed-averaged mean score of the runs in ``table``."""
        X = np.stack([table[s] for s in seeds])                # (k, n_items)
        per_seed = X @ self.W.T                                 # (k, n_boot)
        key = tuple(self.seeds.index(s) for s in seeds)
        if key not in self._cache:
            self._cache[key] = _seed_weights(len(seeds), self.n_boot, self.seed, key)
        return (self._cache[key] * per_seed.T).sum(axis=1)


def _mean_score(table: dict, seeds: list) -> float:
    return float(np.mean([table[s].mean() for s in seeds]))


# --------------------------------------------------------------------------- public API

def layer_contributions(runs: Sequence[dict], *, n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """One row per single layer present, sorted by layer.

    Row keys: ``layer``, ``relative_depth`` (l/(L−1), 0.0 when L == 1), ``contribution`` (the gain
    S_l − S_base averaged over the seeds that have base, full and this layer, over S_full − S_base
    averaged over every seed with base and full), ``ci_low``/``ci_high`` (95 % percentile bootstrap over
    items and seeds), ``per_seed`` (C_l per seed, seeds in sorted order), ``seeds``, ``score`` (S_l),
    ``gain`` (S_l − S_base), ``base_score``, ``full_score`` (over ``full_seeds``), ``n_items``,
    ``n_seeds``, ``n_full_seeds``.
    """
    data = _Runs(runs)
    boot = _Boot(data, n_boot, seed) if n_boot > 0 else None
    L = data.num_layers
    full_seeds = [s for s in _seed_order(data.full) if s in data.base]
    if not data.layers:
        return []
    if not full_seeds:
        raise ValueError("no seed has both a base and a full run")
    # the denominator S_full − S_base is the same for every layer: computed (and bootstrapped) once
    s_full = _mean_score(data.full, full_seeds)
    denom = s_full - _mean_score(data.base, full_seeds)
    full_gain = (boot.boot_means(data.full, full_seeds) - boot.boot_means(data.base, full_seeds)
                 if boot is not None else None)
    rows = []
    for layer in sorted(data.layers):
        table = data.layers[layer]
        seeds = [s for s in _seed_order(table) if s in data.base and s in data.full]
        if not seeds:
            raise ValueError(f"layer {layer}: no seed has base, full and layer runs together "
                             f"(layer seeds {sorted(map(str, table))}, full seeds {sorted(map(str, data.full))})")
        s_l, s_b = _mean_score(table, seeds), _mean_score(data.base, seeds)
        if boot is not None:
            gain = boot.boot_means(table, seeds) - boot.boot_means(data.base, seeds)
            lo, hi = _ci(_ratio(gain, full_gain))
        else:
            lo = hi = float("nan")
        rows.append({
            "layer": layer,
            "relative_depth": layer / (L - 1) if L > 1 else 0.0,
            "contribution": contribution(s_l - s_b, 0.0, denom),
            "ci_low": lo, "ci_high": hi,
            "per_seed": [contribution(float(table[s].mean()), float(data.base[s].mean()), float(data.full[s].mean()))
                         for s in seeds],
            "seeds": seeds,
            "score": s_l, "gain": s_l - s_b, "base_score": s_b, "full_score": s_full,
            "n_items": data.n_items, "n_seeds": len(seeds), "n_full_seeds": len(full_seeds),
            # a collapsed layer or full run among these seeds: the C is reported, and marked
            "collapsed": any(("layer", layer, s) in data.collapsed for s in seeds)
                         or any(("full", None, s) in data.collapsed for s in full_seeds),
        })
    return rows


def full_gain_summary(runs: Sequence[dict], *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Full-RL gain S_full − S_base with a paired bootstrap 95 % CI (items, and seeds when several).

    ``noise`` is True when the CI includes 0: the full run did not measurably beat the base, so every
    C_l of this condition divides by noise.
    """
    data = _Runs(runs)
    seeds = [s for s in _seed_order(data.full) if s in data.base]
    if not seeds:
        raise ValueError("no seed has both a base and a full run")
    s_b, s_f = _mean_score(data.base, seeds), _mean_score(data.full, seeds)
    if n_boot > 0:
        boot = _Boot(data, n_boot, seed)
        lo, hi = _ci(boot.boot_means(data.full, seeds) - boot.boot_means(data.base, seeds))
    else:
        lo = hi = float("nan")
    noise = not (lo > 0 or hi < 0)  # also True when the CI is undefined
    return {
        "gain": s_f - s_b, "ci_low": lo, "ci_high": hi, "noise": bool(noise),
        "base_score": s_b, "full_score": s_f,
        "per_seed": [float(data.full[s].mean() - data.base[s].mean()) for s in seeds], "seeds": seeds,
        "n_items": data.n_items, "n_seeds": len(seeds),
        "collapsed": any(("full", None, s) in data.collapsed for s in seeds),
    }


def concentration(rows: Sequence[dict]) -> dict:
    """How concentrated the gain is: ``best_layer``, ``best_recovery`` (its C), ``n_layers_ge_0_8``,
    ``top3_share`` = (sum of the 3 largest positive C) / (sum of all positive C), nan if none positive."""
    pairs = [(r["layer"], float(r["contribution"])) for r in rows if math.isfinite(float(r["contribution"]))]
    if not pairs:
        return {"best_layer": None, "best_recovery": float("nan"), "n_layers_ge_0_8": 0, "top3_share": float("nan")}
    best_layer, best = max(pairs, key=lambda p: p[1])
    positive = sorted((c for _, c in pairs if c > 0), reverse=True)
    share = sum(positive[:3]) / sum(positive) if positive else float("nan")
    return {
        "best_layer": best_layer, "best_recovery": best,
        "n_layers_ge_0_8": sum(1 for _, c in pairs if c >= 0.8),
        "top3_share": share,
    }


def contribution_profile(rows: Sequence[dict]) -> tuple[list[float], list[float]]:
    """(relative depths, contributions) of ``layer_contributions`` rows, the input ``ranks`` takes."""
    rows = sorted(rows, key=lambda r: r["relative_depth"])
    return [float(r["relative_depth"]) for r in rows], [float(r["contribution"]) for r in rows]
