"""Do single-layer gains add up? The interaction of every trained pair of layers, with a CI.

For blocks i and j trained together (a sweep's `--pairs`), the interaction is

    I_ij = S_ij − S_base − (S_i − S_base) − (S_j − S_base) = S_ij − S_i − S_j + S_base

per eval item and seed, over the seeds that have the pair, both single layers and the base. Its CI
resamples seeds and items (paired: the four runs are scored on the same items). A CI that excludes 0
says the two layers do not add: I > 0, they help each other; I < 0, they overlap. Every C_l assumes the
layers' gains are separate; this tests that assumption on the pairs trained.
"""

from __future__ import annotations

import numpy as np

from onelayer.analysis.contribution import condition_key
from onelayer.stats import seed_item_bootstrap_ci

ADDITIVITY_COLUMNS = ["condition", "pair", "layer_i", "layer_j", "pair_gain", "sum_of_gains", "interaction",
                      "ci_low", "ci_high", "adds_up", "s_pair", "s_i", "s_j", "s_base", "n_seeds", "n_items"]


def _by_blocks(runs: list[dict]) -> dict[tuple, dict]:
    """(block indices) -> {seed: item scores} of a condition's finished runs."""
    out: dict[tuple, dict] = {}
    for r in runs:
        if str(r.get("layers", "")).strip().lower() == "all":  # full RL is not a pair, even on a 2-block model
            continue
        out.setdefault(tuple(r["layer_indices"]), {})[r["seed"]] = np.asarray(r["item_scores"], dtype=float)
    return out


def pair_interactions(records: list[dict]) -> list[dict]:
    """One row per condition and trained pair of blocks that has both single layers and the base."""
    by_condition: dict[str, list[dict]] = {}
    for r in records:
        by_condition.setdefault(condition_key(r), []).append(r)
    rows = []
    for condition, runs in sorted(by_condition.items()):
        table = _by_blocks(runs)
        base = table.get(())
        for pair in sorted(k for k in table if len(k) == 2):
            i, j = pair
            have = [table.get((i,)), table.get((j,)), base]
            if any(h is None for h in have):
                continue
            seeds = sorted(s for s in table[pair] if all(s in h for h in have))
            if not seeds:
                continue
            p, si, sj, sb = (np.stack([t[s] for s in seeds]) for t in (table[pair], table[(i,)], table[(j,)], base))
            inter = p - si - sj + sb  # [seeds, items]
            lo, hi = seed_item_bootstrap_ci(inter)
            rows.append({"condition": condition, "pair": f"{i},{j}", "layer_i": i, "layer_j": j,
                         "pair_gain": float((p - sb).mean()), "sum_of_gains": float((si - sb).mean() + (sj - sb).mean()),
                         "interaction": float(inter.mean()), "ci_low": lo, "ci_high": hi, "adds_up": lo - 1e-9 <= 0 <= hi + 1e-9,
                         "s_pair": float(p.mean()), "s_i": float(si.mean()), "s_j": float(sj.mean()),
                         "s_base": float(sb.mean()), "n_seeds": len(seeds), "n_items": p.shape[1]})
    return rows


def verdict(rows: list[dict]) -> dict:
    """Per condition: how many pairs, which do not add up, and one sentence saying so."""
    out: dict[str, dict] = {}
    for r in rows:
        v = out.setdefault(r["condition"], {"pairs": 0, "not_additive": []})
        v["pairs"] += 1
        if not r["adds_up"]:
            v["not_additive"].append(f"{r['pair']} ({r['interaction']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])")
    for v in out.values():
        v["summary"] = ("every pair's interaction CI includes 0: the single-layer gains add up on these pairs"
                        if not v["not_additive"] else
                        f"{len(v['not_additive'])} of {v['pairs']} pairs do not add up: " + "; ".join(v["not_additive"]))
    return out
