"""Advantage estimators: group-relative (GRPO / Dr. GRPO) and GiGPO (episode + anchor-state step groups).

Pure tensor functions, no I/O. Groups are given as integer ids that need not be contiguous or sorted;
every estimator gives 0 to members of a group of one and to groups whose values are all equal.

The trainer reaches an estimator through `ADVANTAGES`, filled by the `advantage_estimator` decorator.
Every registered estimator has one signature: per-row step rewards, episode (trajectory) ids, group ids
and anchor-state keys in, one advantage per row out, with the reward scaling and the algorithm preset
(for its own constants) as keywords:

    @advantage_estimator("name", scales=("group", "none"))
    def my_advantages(step_rewards, traj_ids, group_ids, anchors, *, scale, preset) -> Tensor: ...
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGES",
    "AdvantageEstimator",
    "advantage_estimator",
    "SCALES",
    "anchor_group_stats",
    "discounted_returns",
    "gigpo_advantages",
    "group_advantages",
]

SCALES = ("group", "batch", "none")


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _group_centered(
    values: Tensor, inverse: Tensor, num_groups: int, eps: float, scale: str
) -> Tensor:
    """Centre ``values`` on their group mean and optionally divide by the group std.

    values: Tensor[N] float; inverse: LongTensor[N] in [0, num_groups); scale: "group" | "none".
    Returns Tensor[N]. Groups of one and constant groups give exactly 0.
    """
    zeros = values.new_zeros(num_groups)
    counts = zeros.index_add(0, inverse, torch.ones_like(values))
    mean = zeros.index_add(0, inverse, values) / counts  # every group id comes from `inverse`: count >= 1
    dev = values - mean[inverse]
    # Exact zero for constant groups: the float mean of equal numbers can differ from them in the last bit,
    # and dividing that by a ~0 std would turn it into a spurious ±1.
    gmax = zeros.scatter_reduce(0, inverse, values, reduce="amax", include_self=False)
    gmin = zeros.scatter_reduce(0, inverse, values, reduce="amin", include_self=False)
    informative = (counts > 1) & (gmax > gmin)
    if scale == "group":
        var = zeros.index_add(0, inverse, dev * dev) / (counts - 1).clamp(min=1)  # unbiased
        dev = dev / (var.sqrt()[inverse] + eps)
    return torch.where(informative[inverse], dev, torch.zeros_like(dev))


def group_advantages(
    rewards: Tensor, group_ids: Tensor, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Group-relative advantage (GRPO / Dr. GRPO).

    A_i = r_i − mean_{j∈g(i)} r_j, then
      "group": ÷ (unbiased std of the group + eps)    (GRPO)
      "batch": ÷ (unbiased std of all rewards + eps)
      "none":  no scaling                              (Dr. GRPO)
    A member of a group of one, and every member of a group with all-equal rewards, gets 0.

    rewards: Tensor[N]; group_ids: LongTensor[N] (any integers, any order). Returns Tensor[N] (float).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = _as_float(rewards)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal length, got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        return rewards.clone()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    adv = _group_centered(rewards, inverse, num_groups, eps, "group" if scale == "group" else "none")
    if scale == "batch":
        std = rewards.std(unbiased=True) if rewards.numel() > 1 else rewards.new_zeros(())
        adv = adv / (std + eps)
    return adv


def discounted_returns(step_rewards: Tensor, traj_ids: Tensor, gamma: float) -> Tensor:
    """Reward-to-go within each trajectory: R_t = Σ_{k≥t} γ^{k−t} r_k.

    step_rewards: Tensor[S]; traj_ids: LongTensor[S]. Rows of one trajectory are in time order but
    trajectories may be interleaved. Returns Tensor[S]. Loops over the longest trajectory length only.
    """
    step_rewards = _as_float(step_rewards)
    S = step_rewards.numel()
    if S == 0:
        return step_rewards.clone()
    _, inv = torch.unique(traj_ids, return_inverse=True)
    num_traj = int(inv.max()) + 1
    # position of each row inside its trajectory: stable sort keeps time order within a trajectory
    order = torch.sort(inv, stable=True).indices
    counts = torch.bincount(inv, minlength=num_traj)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[order] = torch.arange(S, device=inv.device) - starts[inv[order]]
    length = int(counts.max())
    padded = step_rewards.new_zeros(num_traj, length)
    padded[inv, pos] = step_rewards
    out = torch.empty_like(padded)
    acc = step_rewards.new_zeros(num_traj)
    for t in range(length - 1, -1, -1):  # zeros past a trajectory's end leave acc at 0
        acc = padded[:, t] + gamma * acc
        out[:, t] = acc
    return out[inv, pos]


def _anchor_group_index(group_ids: Tensor, anchor_keys: Sequence[Hashable]) -> Tensor:
    """Map each row's (group_id, anchor_key) pair to a dense id. Returns LongTensor[S]."""
    if len(anchor_keys) != group_ids.numel():
        raise ValueError(f"anchor_keys has {len(anchor_keys)} entries, expected {group_ids.numel()}")
    ids: dict[tuple, int] = {}
    dense = [ids.setdefault((g, k), len(ids)) for g, k in zip(group_ids.tolist(), anchor_keys)]
    return torch.tensor(dense, dtype=torch.long, device=group_ids.device)


def episode_returns(step_rewards: Tensor, traj_ids: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per trajectory: its return R(τ) = Σ_t r_t and its group, plus each row's trajectory index.

    step_rewards, traj_ids, group_ids: Tensor[S] (group_ids constant within a trajectory). Returns
    (returns FloatTensor[E], traj_group LongTensor[E], traj_inv LongTensor[S]) over the E distinct trajectories
    in sorted id order.
    """
    _, traj_inv = torch.unique(traj_ids, return_inverse=True)
    num_traj = int(traj_inv.max()) + 1 if traj_inv.numel() else 0
    returns = _as_float(step_rewards).new_zeros(num_traj).index_add(0, traj_inv, _as_float(step_rewards))
    traj_group = group_ids.new_zeros(num_traj).scatter(0, traj_inv, group_ids)
    if not torch.equal(traj_group[traj_inv], group_ids):
        raise ValueError("every step of a trajectory must carry the same group_id")
    return returns, traj_group, traj_inv


def gigpo_advantages(
    step_rewards: Tensor,
    traj_ids: Tensor,
    group_ids: Tensor,
    anchor_keys: Sequence[Hashable],
    *,
    gamma: float = 0.95,
    omega: float = 1.0,
    scale: str = "none",
    eps: float = 1e-6,
) -> Tensor:
    """GiGPO advantage: episode-level group advantage plus anchor-state step-level advantage.

    Rows are environment steps, in time order within each trajectory (trajectories may interleave).
      episode: R(τ) = Σ_t r_t;  A_E(τ) = R(τ) − mean over the trajectories of τ's group (each counted once)
      step:    R_t = Σ_{k≥t} γ^{k−t} r_k;  A_S = R_t − mean of R over rows with the same (group_id, anchor_key)
      "group" scale divides A_E by the unbiased std over its group's trajectories and A_S by the unbiased
      std over its anchor group (+ eps). Singleton or constant groups give 0.
      A = A_E(τ(row)) + ω · A_S(row)

    step_rewards: Tensor[S]; traj_ids: LongTensor[S]; group_ids: LongTensor[S] (constant within a
    trajectory); anchor_keys: S hashables (history-free state keys). Returns Tensor[S] (float).
    """
    if scale not in ("none", "group"):
        raise ValueError(f"gigpo scale must be 'none' or 'group', got {scale!r}")
    step_rewards = _as_float(step_rewards)
    if not (step_rewards.dim() == 1 and traj_ids.shape == step_rewards.shape == group_ids.shape):
        raise ValueError(
            "step_rewards, traj_ids and group_ids must be 1-D of equal length, got "
            f"{tuple(step_rewards.shape)}, {tuple(traj_ids.shape)}, {tuple(group_ids.shape)}"
        )
    S = step_rewards.numel()
    if S == 0:
        return step_rewards.clone()

    # episode level: one value per trajectory
    episode_return, traj_group, traj_inv = episode_returns(step_rewards, traj_ids, group_ids)
    _, tg_inv = torch.unique(traj_group, return_inverse=True)
    a_episode = _group_centered(episode_return, tg_inv, int(tg_inv.max()) + 1, eps, scale)

    # step level: rows that share a (group, anchor state)
    returns = discounted_returns(step_rewards, traj_ids, gamma)
    anchor_inv = _anchor_group_index(group_ids, anchor_keys)
    a_step = _group_centered(returns, anchor_inv, int(anchor_inv.max()) + 1, eps, scale)

    return a_episode[traj_inv] + omega * a_step


def anchor_group_stats(group_ids: Tensor, anchor_keys: Sequence[Hashable]) -> dict[str, float]:
    """How much GiGPO's step-level grouping has to work with.

    group_ids: LongTensor[S]; anchor_keys: S hashables. Returns
      share_in_groups_gt1: fraction of steps whose (group_id, anchor_key) group has more than one step
      num_anchor_groups:   number of distinct (group_id, anchor_key) pairs
      mean_anchor_group_size: S / num_anchor_groups
    All 0 for an empty input.
    """
    S = group_ids.numel()
    if S == 0:
        return {"share_in_groups_gt1": 0.0, "num_anchor_groups": 0, "mean_anchor_group_size": 0.0}
    anchor_inv = _anchor_group_index(group_ids, anchor_keys)
    sizes = torch.bincount(anchor_inv)
    return {
        "share_in_groups_gt1": float((sizes[anchor_inv] > 1).sum()) / S,
        "num_anchor_groups": int(sizes.numel()),
        "mean_anchor_group_size": S / sizes.numel(),
    }


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    fn: Callable[..., Tensor]
    scales: tuple[str, ...]  # the reward scalings it supports (of SCALES)


ADVANTAGES: dict[str, AdvantageEstimator] = {}


def advantage_estimator(name: str, scales: Sequence[str] = SCALES):
    """Register `fn(step_rewards, traj_ids, group_ids, anchors, *, scale, preset) -> Tensor[S]` as `name`."""
    bad = [s for s in scales if s not in SCALES]
    if bad:
        raise ValueError(f"advantage estimator {name!r}: unknown scalings {bad}; valid: {', '.join(SCALES)}")

    def register(fn):
        ADVANTAGES[name] = AdvantageEstimator(name, fn, tuple(scales))
        return fn
    return register


@advantage_estimator("group")
def episode_group_advantages(step_rewards: Tensor, traj_ids: Tensor, group_ids: Tensor, anchors, *, scale: str,
                             preset=None) -> Tensor:
    """GRPO / Dr. GRPO: each episode's return against its group's (`group_advantages`), given to every row
    of the episode (a single-turn completion is a one-row episode)."""
    returns, traj_group, inverse = episode_returns(step_rewards, traj_ids, group_ids)
    return group_advantages(returns, traj_group, scale=scale)[inverse]


@advantage_estimator("gigpo", scales=("group", "none"))
def gigpo_row_advantages(step_rewards: Tensor, traj_ids: Tensor, group_ids: Tensor, anchors, *, scale: str,
                         preset=None) -> Tensor:
    """GiGPO: episode-level plus anchor-state step-level advantages (`gigpo_advantages`), with the preset's
    discount `gamma` and step weight `omega` (0.95 and 1 without a preset)."""
    return gigpo_advantages(step_rewards, traj_ids, group_ids, anchors, gamma=getattr(preset, "gamma", 0.95),
                            omega=getattr(preset, "omega", 1.0), scale=scale)
