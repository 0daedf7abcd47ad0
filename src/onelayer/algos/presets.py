"""Named algorithm presets: which advantage estimator, reward scaling, loss aggregation and KL weight.

grpo    = group advantages, group-std scaling, seq-mean-token-mean
dr_grpo = group advantages, no scaling, seq-mean-token-sum-norm, β = 0
gigpo   = gigpo advantages (γ = 0.95, ω = 1, group-std scaling of both terms), token-mean

GiGPO scales by the group std, as the GiGPO paper and verl-agent do by default (measured comparison
with the unscaled variant: README, Tasks). `--scale-rewards none` restores the unscaled variant.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "AlgoPreset", "get_preset"]


@dataclass(frozen=True)
class AlgoPreset:
    name: str
    advantage: str  # key of onelayer.algos.ADVANTAGES
    scale: str  # "group" | "batch" | "none" (gigpo: "group" | "none")
    loss_agg: str  # one of onelayer.algos.LOSS_AGGREGATIONS
    beta: float  # weight of the k3 KL penalty to the reference policy
    gamma: float = 0.95  # gigpo only: discount of the step-level return
    omega: float = 1.0  # gigpo only: weight of the step-level advantage


PRESETS: dict[str, AlgoPreset] = {
    "grpo": AlgoPreset("grpo", "group", "group", "seq-mean-token-mean", 0.0),
    "dr_grpo": AlgoPreset("dr_grpo", "group", "none", "seq-mean-token-sum-norm", 0.0),
    "gigpo": AlgoPreset("gigpo", "gigpo", "group", "token-mean", 0.0),
}


def get_preset(name: str) -> AlgoPreset:
    """Return the preset called ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
