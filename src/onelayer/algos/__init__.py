"""Algorithm math for onelayer: advantage estimators, the clipped policy loss and named presets.

Pure tensor functions with no I/O and no imports from the rest of the project.
"""

from onelayer.algos.advantages import (
    ADVANTAGES,
    SCALES,
    AdvantageEstimator,
    advantage_estimator,
    anchor_group_stats,
    discounted_returns,
    episode_returns,
    gigpo_advantages,
    group_advantages,
)
from onelayer.algos.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    kl_k3,
    loss_denominator,
    merge_duplicate_rows,
    policy_loss,
)
from onelayer.algos.presets import PRESETS, AlgoPreset, get_preset

__all__ = [
    "ADVANTAGES",
    "LOSS_AGGREGATIONS",
    "SCALES",
    "AdvantageEstimator",
    "advantage_estimator",
    "PRESETS",
    "AlgoPreset",
    "aggregate_loss",
    "anchor_group_stats",
    "discounted_returns",
    "get_preset",
    "episode_returns",
    "gigpo_advantages",
    "group_advantages",
    "kl_k3",
    "loss_denominator",
    "merge_duplicate_rows",
    "policy_loss",
]
