"""Clipped policy-gradient loss with optional k3 KL penalty and the GRPO / Dr. GRPO / DAPO aggregations.

Pure tensor functions, no I/O. Padded tokens (mask 0) never reach exp() or the gradient, so garbage
log-probs there (large values, ±inf, NaN) do not change the loss or its gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOSS_AGGREGATIONS", "aggregate_loss", "kl_k3", "loss_denominator", "merge_duplicate_rows",
           "policy_loss"]

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean")


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π‖π_ref), elementwise: exp(ref − logp) − (ref − logp) − 1 ≥ 0.

    logp, ref_logp: Tensor[...] of the same shape. Returns Tensor[...].
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def loss_denominator(mask: Tensor, agg: str, norm_len: int | None = None, weights: Tensor | None = None) -> Tensor:
    """The normaliser ``aggregate_loss`` divides by: Σ w (seq-mean-token-mean), Σ w · norm_len
    (seq-mean-token-sum-norm) or Σ w · tokens (token-mean, before its clamp at 1). A shard of a batch
    (one process's rows) sums its value with the other shards' and passes the total as ``denominator``,
    so the shards' losses add up to the whole batch's.

    mask: Tensor[B,T] float; weights: Tensor[B] or None. Returns a scalar Tensor.
    """
    w = torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device) if weights is None else weights.to(mask.dtype)
    if agg == "seq-mean-token-mean":
        return w.sum()
    if agg == "seq-mean-token-sum-norm":
        n = mask.shape[-1] if norm_len is None else norm_len
        if n <= 0:
            raise ValueError(f"norm_len must be positive, got {n}")
        return w.sum() * n
    if agg == "token-mean":
        return (w * mask.sum(-1)).sum()
    raise ValueError(f"agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")


def aggregate_loss(
    per_token: Tensor, mask: Tensor, agg: str, norm_len: int | None = None, weights: Tensor | None = None,
    denominator: Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    per_token: Tensor[B,T] (already 0 where mask is 0); mask: Tensor[B,T] float.
      "seq-mean-token-mean"     (GRPO):      mean_i [ Σ_t m ℓ / max(Σ_t m, 1) ]
                                 A row without tokens contributes 0 but still counts in the mean over B.
      "seq-mean-token-sum-norm" (Dr. GRPO):  Σ m ℓ / (B · norm_len),  norm_len defaults to T
      "token-mean"              (DAPO/BNPO): Σ m ℓ / max(Σ m, 1)
    weights: Tensor[B] or None, how many rows each row stands for (``merge_duplicate_rows``): every sum
    over rows, numerator and denominator, counts row i w_i times, so a merged batch gives the loss of
    the batch it came from.
    denominator: the whole batch's ``loss_denominator`` when these rows are a shard of it (default: this
    batch's own), so the shards' results sum to the whole batch's loss.
    Returns a scalar Tensor.
    """
    w = torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device) if weights is None else weights.to(mask.dtype)
    masked = per_token * mask
    den = loss_denominator(mask, agg, norm_len, weights) if denominator is None else denominator
    if agg == "seq-mean-token-mean":
        return (w * masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / den
    if agg == "seq-mean-token-sum-norm":
        return (w * masked.sum(-1)).sum() / den
    if agg == "token-mean":
        return (w * masked.sum(-1)).sum() / den.clamp(min=1)
    raise ValueError(f"agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")


def merge_duplicate_rows(keys: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge rows that would give the same loss terms, so the forward runs once per distinct row.

    keys: Tensor[B,K], integer, one row per sequence (its token ids and masks, concatenated);
    advantages: Tensor[B], one per sequence.
    Rows with equal keys and an advantage of the same sign (−, 0, +) merge into one row of weight w
    (how many they were) and advantage mean(A) over them. That is exact for ``policy_loss`` with
    ``weights=w``: equal rows have equal ratios ρ, and within one sign min(ρ·A, clip(ρ)·A) is linear
    in A, so Σ_i min(ρ·A_i, clip(ρ)·A_i) = w · min(ρ·Ā, clip(ρ)·Ā); the KL term and the token counts
    are the same for every copy. On agent tasks the same (state, action) recurs across a group's
    episodes, and a confident policy repeats its completions on single-turn tasks.

    Returns (rows: LongTensor[U], one original row per merged row, ascending; weights: FloatTensor[U];
    advantages: FloatTensor[U]).
    """
    if keys.dim() != 2 or advantages.shape != (keys.shape[0],):
        raise ValueError(f"keys must be [B,K] and advantages [B]; got {tuple(keys.shape)}, {tuple(advantages.shape)}")
    sign = torch.sign(advantages.detach()).to(keys.dtype).unsqueeze(-1)
    _, inverse = torch.unique(torch.cat([keys, sign], 1), dim=0, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    first = torch.full((n,), keys.shape[0], dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(keys.shape[0]), reduce="amin")
    order = torch.argsort(first)  # merged rows in the order of their first original row
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n))
    weights = torch.bincount(rank[inverse], minlength=n).to(torch.float32)
    total = torch.zeros(n, dtype=torch.float32).index_add_(0, rank[inverse], advantages.detach().float())
    return first[order], weights, total / weights


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    n = float(mask.sum())
    return float((x * mask).sum()) / n if n > 0 else 0.0


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    agg: str = "seq-mean-token-mean",
    norm_len: int | None = None,
    weights: Tensor | None = None,
    denominator: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-style clipped surrogate loss (GRPO family), differentiable wrt ``logp``.

    ρ = exp(logp − old_logp)
    ℓ = −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·k3(logp, ref_logp)      (KL term only when β > 0)
    then reduced by ``aggregate_loss(ℓ, mask, agg, norm_len)``.

    logp, old_logp, mask: Tensor[B,T] (mask bool or float); advantages: Tensor[B] (one per sequence)
    or Tensor[B,T] (per token); ref_logp: Tensor[B,T] or None. old_logp and ref_logp are treated as
    constants. clip_eps_high defaults to clip_eps. weights: Tensor[B] or None, row multiplicities from
    ``merge_duplicate_rows`` (the loss and the stats count row i w_i times). denominator: the whole batch's
    ``loss_denominator`` when these rows are a shard of it (``aggregate_loss``).

    Returns (loss: scalar Tensor, stats) where stats are python floats over masked tokens:
      loss, clip_frac, clip_frac_low, clip_frac_high, ratio_mean, kl (mean k3; 0.0 without ref_logp).
    clip_frac counts tokens whose gradient the clip removed, as in TRL:
      low = (ρ < 1−ε) & (A < 0), high = (ρ > 1+ε_high) & (A > 0).
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [B,T]; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or [B,T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    # Compute in float32 (logp may be bf16) and select before exp(): torch.where routes zero gradient
    # to the unselected branch, so garbage in padded positions can't produce inf/NaN in loss or grads.
    if weights is not None and weights.shape != (logp.shape[0],):
        raise ValueError(f"weights must be [B] = [{logp.shape[0]}], got {tuple(weights.shape)}")
    valid = mask.bool()
    m = valid.to(torch.float32)
    logp = logp.float()
    zero = torch.zeros_like(logp)
    adv = torch.where(valid, advantages.detach().float(), zero)
    log_ratio = torch.where(valid, logp - old_logp.detach().float(), zero)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)

    kl = None
    if ref_logp is not None:
        kl = kl_k3(torch.where(valid, logp, zero), torch.where(valid, ref_logp.detach().float(), zero))
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, zero)
    loss = aggregate_loss(per_token, m, agg, norm_len, weights, denominator)

    with torch.no_grad():
        if weights is not None:  # the stats count row i w_i times, as the loss does
            m = m * weights.to(m.device, torch.float32).unsqueeze(-1)
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        stats = {
            "loss": float(loss.detach()),
            "clip_frac": _masked_mean(torch.maximum(low, high), m),
            "clip_frac_low": _masked_mean(low, m),
            "clip_frac_high": _masked_mean(high, m),
            "ratio_mean": _masked_mean(ratio, m),
            "kl": _masked_mean(kl, m) if kl is not None else 0.0,
        }
    return loss, stats
