"""The policy update of one RL step: `num_iterations` passes of the clipped policy-gradient loss over
minibatches of the step's rows, duplicates merged, gradients clipped, AdamW stepped. With several processes
(`train.distributed`) the minibatches are those of the whole step's rows, each process running its own rows
of each, and every loss is normalised by the whole minibatch."""

from __future__ import annotations

import math

import torch

from onelayer.algos import loss_denominator, merge_duplicate_rows, policy_loss
from onelayer.train.distributed import Parallel


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says what was kept."""


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate of (0-based) `step`: rising linearly to `lr` over the first `warmup_steps` steps."""
    return lr if step >= warmup_steps else lr * (step + 1) / warmup_steps


def merged_rows(batch, advantages, idx, merge: bool):
    """The rows of minibatch `idx` the update runs, their weights and advantages: duplicates merged
    (``algos.merge_duplicate_rows``) when `merge` and the advantages are per row, else all of them. No rows
    (a process holding none of a minibatch's rows): row 0 at weight 0, a forward and backward that add
    nothing to the loss, its statistics or the gradient, but take part in the collectives."""
    if not len(idx):
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, device=advantages.device), advantages[:1]
    if not merge or advantages.dim() != 1:
        return idx, None, advantages[idx]
    keys = torch.cat([batch.input_ids[idx], batch.attention_mask[idx], batch.completion_mask[idx].long()], 1)
    rows, weights, adv = merge_duplicate_rows(keys.cpu(), advantages[idx].cpu())
    device = advantages.device
    return idx[rows], weights.to(device), adv.to(device)


def update(cfg, optimizer, params, batch, advantages, logprobs, ref_logp, *, loss_agg: str, beta: float,
           norm_len: int, generator: torch.Generator, parallel: Parallel | None = None) -> dict:
    """Run the update and return its metrics (the loss statistics averaged over optimizer steps, grad_norm,
    update_rows: the share of rows the forward ran). `logprobs(idx)` is the differentiable forward of rows
    `idx`. A non-finite loss raises `TrainingError` before any step is taken with it. `parallel`: this
    process's share of a job over several (`train.distributed`); the metrics are the whole job's."""
    par = parallel or Parallel()
    n = batch.input_ids.shape[0]
    stats_sum: dict[str, float] = {}
    updates, grad_norm, rows_run = 0, 0.0, 0
    for _ in range(cfg.num_iterations):
        for mine in par.minibatches(n, cfg.mini_batch_size, generator):
            idx, weights, adv = merged_rows(batch, advantages, mine, cfg.merge_duplicates)
            rows_run += len(idx) if len(mine) else 0  # not the placeholder row of an empty share
            mask = batch.completion_mask[idx]
            loss, stats = policy_loss(
                logprobs(idx), batch.logprobs[idx], adv, mask,
                clip_eps=cfg.epsilon, clip_eps_high=cfg.epsilon_high, beta=beta, agg=loss_agg,
                ref_logp=None if ref_logp is None else ref_logp[idx], norm_len=norm_len, weights=weights,
                denominator=par.denominator(loss_denominator(mask, loss_agg, norm_len, weights)),
            )
            stats = par.loss_stats(stats, float((mask.sum(-1) * (1 if weights is None else weights)).sum()))
            if not torch.isfinite(loss) or not math.isfinite(stats["loss"]):
                raise TrainingError(f"non-finite loss ({stats['loss']})")
            optimizer.zero_grad(set_to_none=True)
            par.backward(loss)
            if cfg.max_grad_norm > 0:
                grad_norm += par.clip_grad_norm(params, cfg.max_grad_norm)
            optimizer.step()
            updates += 1
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
    return {**{k: v / updates for k, v in stats_sum.items()}, "grad_norm": grad_norm / updates,
            "update_rows": rows_run / (n * cfg.num_iterations)}  # this rank's; the loop averages it


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state (AdamW: two moments per trainable tensor)."""
    return sum(_local(t).numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) state tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t
