"""The collapse guard: has a run's training signal fallen apart? Pure functions over the step metrics.

RL amplifies small differences: the same config can improve on one machine and collapse on another
(the policy drifts into a region where it no longer samples rewarded completions, and the updates then
only push it further). The guard watches three signals in ``metrics.jsonl`` and reports the first
step at which one of them has failed for ``patience`` consecutive steps:

- the rolling mean training reward (over ``window`` steps) is below ``fraction`` of its value over the
  first ``window`` steps (only when that starting value is positive: a run that never earned reward
  has nothing to lose);
- the mean KL to the reference exceeds ``max_kl`` (runs with ``beta > 0``);
- agent tasks: the rolling invalid-action rate exceeds its starting value by ``max_invalid_rise``.

It flags and records (``collapsed`` in ``eval.json``); it does not stop the run, since the eval score
says how bad the end point is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseRule:
    window: int = 10  # steps in the rolling means
    fraction: float = 0.5  # collapse: rolling reward below this fraction of the starting reward
    patience: int = 10  # ... for this many consecutive steps
    max_kl: float = 1.0  # collapse: mean KL above this for `patience` steps
    max_invalid_rise: float = 0.3  # agent tasks: invalid-action rate this far above its start


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def check_collapse(metrics: list[dict], rule: CollapseRule = CollapseRule()) -> dict | None:
    """The first collapse in `metrics` (step dicts in order), or None.

    Returns ``{"step", "signal", "value", "threshold", "start"}``: the step at which the signal had been
    past its threshold for ``rule.patience`` consecutive steps, its rolling value there, the threshold
    and its starting value."""
    w = rule.window
    if len(metrics) < w + rule.patience:
        return None
    start_reward = _mean([m["reward_mean"] for m in metrics[:w]])
    has_invalid = all("invalid_rate" in m for m in metrics)
    start_invalid = _mean([m["invalid_rate"] for m in metrics[:w]]) if has_invalid else None
    streak: dict[str, int] = {}
    for i in range(w, len(metrics)):
        recent = metrics[i - w + 1 : i + 1]
        checks = []
        if start_reward > 0:
            checks.append(("reward_mean", _mean([m["reward_mean"] for m in recent]), rule.fraction * start_reward,
                           start_reward, "below"))
        if "kl" in metrics[i]:
            checks.append(("kl", _mean([m["kl"] for m in recent]), rule.max_kl, metrics[0].get("kl", 0.0), "above"))
        if has_invalid:
            checks.append(("invalid_rate", _mean([m["invalid_rate"] for m in recent]),
                           start_invalid + rule.max_invalid_rise, start_invalid, "above"))
        for signal, value, threshold, start, direction in checks:
            failed = value < threshold if direction == "below" else value > threshold
            streak[signal] = streak.get(signal, 0) + 1 if failed else 0
            if streak[signal] >= rule.patience:
                return {"step": metrics[i]["step"], "signal": signal, "value": value, "threshold": threshold,
                        "start": start}
    return None


def describe(collapse: dict) -> str:
    return (f"training collapsed at step {collapse['step']}: rolling {collapse['signal']} {collapse['value']:.3f} "
            f"past its threshold {collapse['threshold']:.3f} (start {collapse['start']:.3f})")
