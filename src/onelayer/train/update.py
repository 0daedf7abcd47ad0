"""The policy update of one RL step: `num_iterations` passes of the clipped policy-gradient loss over
minibatches of the step's rows, duplicates merged, gradients clipped, AdamW stepped."""

from __future__ import annotations

import torch

from onelayer.algos import merge_duplicate_rows, policy_loss


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says what was kept."""


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate of (0-based) `step`: rising linearly to `lr` over the first `warmup_steps` steps."""
    return lr if step >= warmup_steps else lr * (step + 1) / warmup_steps


def merged_rows(batch, advantages, idx, merge: bool):
    """The rows of minibatch `idx` the update runs, their weights and advantages: duplicates merged
    (``algos.merge_duplicate_rows``) when `merge` and the advantages are per row, else all of them."""
    if not merge or advantages.dim() != 1:
        return idx, None, advantages[idx]
    keys = torch.cat([batch.input_ids[idx], batch.attention_mask[idx], batch.completion_mask[idx].long()], 1)
    rows, weights, adv = merge_duplicate_rows(keys.cpu(), advantages[idx].cpu())
    device = advantages.device
    return idx[rows], weights.to(device), adv.to(device)


def update(cfg, optimizer, params, batch, advantages, logprobs, ref_logp, *, loss_agg: str, beta: float,
           norm_len: int, generator: torch.Generator) -> dict:
    """Run the update and return its metrics (the loss statistics averaged over optimizer steps, grad_norm,
    update_rows: the share of rows the forward ran). `logprobs(idx)` is the differentiable forward of rows
    `idx`. A non-finite loss raises `TrainingError` before any step is taken with it."""
    n = batch.input_ids.shape[0]
    stats_sum: dict[str, float] = {}
    updates, grad_norm, rows_run = 0, 0.0, 0
    for _ in range(cfg.num_iterations):
        for idx in torch.randperm(n, generator=generator).split(cfg.mini_batch_size or n):
            idx, weights, adv = merged_rows(batch, advantages, idx, cfg.merge_duplicates)
            rows_run += len(idx)
            loss, stats = policy_loss(
                logprobs(idx), batch.logprobs[idx], adv, batch.completion_mask[idx],
                clip_eps=cfg.epsilon, clip_eps_high=cfg.epsilon_high, beta=beta, agg=loss_agg,
                ref_logp=None if ref_logp is None else ref_logp[idx], norm_len=norm_len, weights=weights,
            )
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                grad_norm += float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            updates += 1
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
    return {**{k: v / updates for k, v in stats_sum.items()}, "grad_norm": grad_norm / updates,
            "update_rows": rows_run / (n * cfg.num_iterations)}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state (AdamW: two moments per trainable tensor)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
