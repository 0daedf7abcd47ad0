"""The RL loop: one run of GRPO / Dr. GRPO / GiGPO that updates only the selected layers.

Read top to bottom: set up (task, policy, layer selection, optimizer, resume) → evaluate the base →
for each step: sample G completions per prompt (or play G episodes per seed, for agent tasks) and
score them, compute advantages, run `num_iterations` clipped policy-gradient passes over minibatches,
log → evaluate again → write `eval.json`, the model, and the frozen-tensor check. Algorithm math lives
in `onelayer.algos`; experience collection in `onelayer.train.experience`.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from onelayer import tasks
from onelayer.algos import get_preset, merge_duplicate_rows, policy_loss
from onelayer.config import ConfigError, TrainConfig
from onelayer.io import append_jsonl, atomic_write_json, read_json, read_jsonl, replace_dir, write_jsonl
from onelayer.models.layers import (
    copy_trainable, fingerprint_frozen, frozen_unchanged, select_layers, swap_weights, trainable_parameters,
)
from onelayer.stats import bootstrap_ci, paired_bootstrap_ci
from onelayer.train.checkpoint import load_checkpoint, save_checkpoint
from onelayer.models.prefix import reuse_block
from onelayer.rollout import sample
from onelayer import rundir
from onelayer.policy import forward_path, kernels, sequence_block_input, sequence_logprobs
from onelayer.train.evaluate import task_scores
from onelayer.train.experience import advantages as step_advantages
from onelayer.train.collapse import CollapseRule, check_collapse
from onelayer.train.collapse import describe as describe_collapse
from onelayer.train.experience import collect
from onelayer.tasks.prompts import TRAINED_FORMAT_FILE
from onelayer.train.precision import Precision
from onelayer.train.selection import BestKeeper, holdout, is_check_step
from onelayer.train.warmstart import warm_start_info
from onelayer.train.setup import (
    check_backend, format_task, load_model, resolve_device, rollout_sampler, setup_torch, with_task_defaults,
)

class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says what was kept."""


def run(cfg: TrainConfig, out: str | Path, log=print) -> dict:
    """Train according to `cfg`, writing everything under `out`; returns the eval record."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rundir.is_done(out):
        log(f"{out} is already done; not training again (remove it to rerun)")
        return read_json(out / "eval.json")
    rundir.check_resumable(cfg, out)
    setup_torch(cfg)
    device = resolve_device(cfg.device)

    task = tasks.make(cfg.task, **cfg.task_opts)
    user_cfg, cfg = cfg, with_task_defaults(cfg, task)  # unset settings take the task's suggestions
    preset = get_preset(cfg.algo)
    scale = cfg.scale_rewards or preset.scale
    loss_agg = cfg.loss_type or preset.loss_agg
    max_new = cfg.max_completion_length
    check_backend(cfg)
    model, tok, source = load_model(cfg, task, max_new, device, log)
    # prompts for this model: raw, few-shot or chat (a chat reply gets a longer default budget)
    task, cfg = format_task(cfg, task, tok, budget_given=user_cfg.max_completion_length is not None)
    max_new = cfg.max_completion_length

    # `all` means full-parameter RL (embeddings, final norm, head too); any other spec trains blocks only.
    selection = select_layers(model, cfg.layers, block_path=cfg.block_path, train_embeddings=cfg.train_embeddings,
                              train_lm_head=cfg.train_lm_head, train_non_block=cfg.layers.strip().lower() == "all")
    log(f"layers {cfg.layers!r} -> blocks {selection.indices} of {selection.num_layers}; trainable parameters "
        f"{selection.trainable_params:,} of {selection.total_params:,} "
        f"({selection.trainable_params / selection.total_params:.1%})")
    precision = Precision.from_config(cfg.dtype, cfg.frozen_dtype, device)
    precision.apply(model)  # trainable tensors float32, frozen ones in frozen_dtype
    with precision.autocast():
        forward = forward_path(model)  # lean, or the model's own with the reason
    log(f"precision: {precision.describe()}; forward: {forward}")
    fingerprint = fingerprint_frozen(model)
    ref_weights = copy_trainable(model) if cfg.beta > 0 else None  # one copy of the trainable blocks only
    # frozen-prefix reuse: with blocks 0..l-1 and the embeddings frozen, the hidden states entering block l
    # are computed once per batch (captured during the rollout) and every later forward starts at block l
    reuse_at = reuse_block(model, cfg.block_path) if cfg.prefix_reuse else None
    if reuse_at is not None:
        log(f"frozen-prefix reuse: log-prob and update forwards start at block {reuse_at}")
    sample_fn = rollout_sampler(cfg, model, tok, source, out)  # onelayer's sampler, or vLLM's
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay) if params else None

    resolved = {**cfg.to_dict(), "scale_rewards": scale, "loss_type": loss_agg,
                "model_source": str(source), "layer_indices": selection.indices, "num_layers": selection.num_layers,
                "trainable_params": selection.trainable_params, "total_params": selection.total_params,
                "task_options": task.options, "config_hash": rundir.config_hash(user_cfg),
                "precision": precision.describe(), "forward": forward}
    atomic_write_json(out / "config.json", resolved)
    rundir.set_status(out, "running")

    start_step = 0
    if optimizer is not None and (state := load_checkpoint(out / "checkpoint", model, optimizer)):
        start_step = state["step"]
        log(f"resuming from the checkpoint at step {start_step}")
    write_jsonl(out / "metrics.jsonl", [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] <= start_step])

    train_items, eval_items = task.items("train"), task.items("eval")
    # early stopping: a slice of the train split, never sampled for RL, scores the policy every few steps
    keeper, check_items = None, []
    if cfg.check_every and optimizer is not None:
        train_items, check_items = holdout(train_items, cfg.check_items)
        keeper = BestKeeper(out)

    def evaluate():
        with precision.autocast():
            return task_scores(model.eval(), tok, task, eval_items, max_new_tokens=max_new)
    base_scores = rundir.cached_scores(out / "base_eval.json", evaluate)
    log(f"base score {_mean(base_scores):.1%} on {len(eval_items)} eval items")

    writer = _tensorboard(out) if cfg.tensorboard else None

    def check(step: int) -> float | None:  # the train-split check at `step`, if one is due there
        if keeper is None or not is_check_step(step, cfg.check_every, cfg.max_steps) or keeper.checked(step):
            return None
        with precision.autocast():
            score = _mean(task_scores(model.eval(), tok, task, check_items, max_new_tokens=max_new))
        keeper.record(step, score, model)
        if writer is not None:
            writer.add_scalar("check/score", score, step)
        return score

    steps = range(start_step, cfg.max_steps) if optimizer is not None else range(0)
    history = read_jsonl(out / "metrics.jsonl")  # every step's metrics so far, for the collapse guard
    elapsed = sum(m.get("seconds", 0.0) for m in history)
    rule = CollapseRule(window=cfg.collapse_window, fraction=cfg.collapse_fraction, patience=cfg.collapse_window)
    collapse = check_collapse(history, rule)
    check(start_step)  # the base (step 0), or a check a killed run had not recorded yet
    with _progress(cfg, steps) as bar:
        for step in bar:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = warmup_lr(cfg.learning_rate, step, cfg.warmup_steps)
            rng = random.Random(cfg.seed * 1_000_003 + step)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            items = rng.sample(train_items, min(cfg.prompts_per_step, len(train_items)))

            # rollout + reward: G completions per prompt (G episodes per seed for agent tasks), with the
            # behaviour log-probs for the ratio, then advantages
            if sample_fn is not sample:
                sample_fn.sync_weights(model)  # push the updated trainable tensors into the engine
            with precision.autocast():
                exp = collect(model.eval(), tok, task, items, num_generations=cfg.num_generations,
                              max_new_tokens=max_new, temperature=cfg.temperature, top_p=cfg.top_p, generator=gen,
                              sample_fn=sample_fn, block_path=cfg.block_path,
                              # vLLM hands out no hidden states: then the prefix is computed once per batch below
                              capture_block=reuse_at if sample_fn is sample else None)
            batch = exp.batch
            advantages = step_advantages(exp, preset, scale, cfg.balance_episodes).to(device)
            t2 = time.perf_counter()

            # log-probs: the frozen prefix's output (unless the rollout captured it), then the reference's
            hidden = batch.block_input
            if reuse_at is not None and hidden is None:
                with precision.autocast():
                    hidden = sequence_block_input(model, batch.input_ids, batch.attention_mask, reuse_at,
                                                  cfg.block_path)

            def logprobs(idx):  # float32 log-probs; the forward under autocast when mixed
                start = {} if reuse_at is None else {"block_input": hidden[idx], "block_index": reuse_at,
                                                     "block_path": cfg.block_path}
                with precision.autocast():
                    return sequence_logprobs(model, batch.input_ids[idx], batch.attention_mask[idx],
                                             batch.prompt_len, temperature=cfg.temperature,
                                             prompt_index=batch.prompt_index[idx], **start)

            ref_logp = None
            if ref_weights is not None:
                with torch.no_grad(), swap_weights(model, ref_weights):
                    ref_logp = logprobs(slice(None))
            t3 = time.perf_counter()

            # update: num_iterations passes of clipped policy gradient over minibatches
            model.train()
            n = batch.input_ids.shape[0]
            mb = cfg.mini_batch_size or n
            stats_sum: dict[str, float] = {}
            updates, grad_norm, rows_run = 0, 0.0, 0
            for _ in range(cfg.num_iterations):
                for idx in torch.randperm(n, generator=gen).split(mb):
                    idx, weights, adv = _merged(batch, advantages, idx, cfg.merge_duplicates)
                    rows_run += len(idx)
                    logp = logprobs(idx)
                    loss, stats = policy_loss(
                        logp, batch.logprobs[idx], adv, batch.completion_mask[idx],
                        clip_eps=cfg.epsilon, clip_eps_high=cfg.epsilon_high, beta=cfg.beta, agg=loss_agg,
                        ref_logp=None if ref_logp is None else ref_logp[idx], norm_len=max_new, weights=weights,
                    )
                    if not torch.isfinite(loss):
                        rundir.set_status(out, "failed", error=f"non-finite loss at step {step}")
                        raise TrainingError(
                            f"non-finite loss ({loss.item()}) at step {step}; the last checkpoint "
                            f"(every {cfg.save_every} steps) and metrics.jsonl are kept in {out}. "
                            "Try a lower learning_rate or check the reward function for NaN/inf."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm > 0:
                        grad_norm += float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                    optimizer.step()
                    updates += 1
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + v
            t4 = time.perf_counter()

            elapsed += t4 - t0
            metrics = {
                "step": step + 1,
                **exp.metrics,
                **{k: v / updates for k, v in stats_sum.items()},
                "grad_norm": grad_norm / updates,
                "completion_len": batch.completion_lengths.float().mean().item(),
                "update_rows": rows_run / (n * cfg.num_iterations),  # share of rows the update forward ran
                "seconds": t4 - t0, "logprob_s": t3 - t2, "update_s": t4 - t3, "elapsed_s": elapsed,
                "optimizer_bytes": optimizer_state_bytes(optimizer),
            }
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
                metrics["eval_score"] = _mean(evaluate())
            append_jsonl(out / "metrics.jsonl", metrics)
            history.append(metrics)
            if collapse is None and (collapse := check_collapse(history, rule)) is not None:
                log(f"warning: {describe_collapse(collapse)}; eval.json will record collapsed: true")
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"train/{k}", v, step + 1)
            checked = keeper is not None and is_check_step(step + 1, cfg.check_every, cfg.max_steps)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or checked:
                # saved before the check, so a resumed run has the weights of every check it recorded
                save_checkpoint(out / "checkpoint", model, optimizer, {"step": step + 1, "config_hash": rundir.config_hash(user_cfg)})
            if checked:
                check(step + 1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}",
                            **({"check": f"{keeper.checks[-1]['score']:.1%}"} if keeper and keeper.checks else {}))

    selected = cfg.max_steps if optimizer is not None else 0
    if keeper is not None and cfg.keep_best and keeper.best and keeper.best["step"] != selected:
        keeper.restore(model)
        last = next((c["score"] for c in keeper.checks if c["step"] == selected), float("nan"))
        log(f"keeping the weights of step {keeper.best['step']}: train-split check {keeper.best['score']:.1%} "
            f"vs {last:.1%} at step {selected} ({len(check_items)} held-out train items; the eval split is not used)")
        selected = keeper.best["step"]

    scores = evaluate()
    unchanged, changed = frozen_unchanged(model, fingerprint)
    record = {
        "score": _mean(scores), "ci95": bootstrap_ci(scores), "n": len(scores),
        "task": cfg.task, "task_options": task.options, "model": cfg.model, "algo": cfg.algo, "seed": cfg.seed,
        "layers": cfg.layers, "layer_indices": selection.indices, "num_layers": selection.num_layers,
        "prompt_format": cfg.prompt_format, "precision": precision.describe(),
        "trainable_params": selection.trainable_params, "total_params": selection.total_params,
        "base_score": _mean(base_scores), "base_ci95": bootstrap_ci(base_scores),
        "gain": _mean(scores) - _mean(base_scores), "gain_ci95": paired_bootstrap_ci(scores, base_scores),
        "frozen_unchanged": unchanged, "frozen_changed": changed, "cpu_kernels": kernels.choices(),
        "collapsed": collapse is not None, "collapse": collapse,
        "warm_start": warm_start_info(source) if (Path(str(source)) / "warmstart.json").is_file() else None,
        "steps": cfg.max_steps if optimizer is not None else 0, "train_seconds": round(elapsed, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),  # this process: setup, evals, checks, training
        "selected_step": selected, "checks": keeper.checks if keeper is not None else [],
        "check_items": len(check_items),
        "item_ids": [it["id"] for it in eval_items], "item_scores": scores, "base_item_scores": base_scores,
    }
    if writer is not None:
        writer.add_scalar("eval/score", record["score"], cfg.max_steps)
        writer.close()
    if cfg.save_model:
        tmp = out / ".model.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / TRAINED_FORMAT_FILE, {"prompt_format": cfg.prompt_format})  # eval's default
        replace_dir(tmp, out / "model")
    atomic_write_json(out / "eval.json", record)
    rundir.set_status(out, "done")
    log(f"cpu kernels: {kernels.summary()}")
    log(f"score {record['score']:.1%} (base {record['base_score']:.1%}), gain {record['gain']:+.1%} "
        f"95% CI [{record['gain_ci95'][0]:+.1%}, {record['gain_ci95'][1]:+.1%}]; "
        f"frozen tensors unchanged: {unchanged}")
    return record


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate of (0-based) `step`: rising linearly to `lr` over the first `warmup_steps` steps."""
    return lr if step >= warmup_steps else lr * (step + 1) / warmup_steps


def _merged(batch, advantages, idx, merge: bool):
    """The rows of minibatch `idx` the update runs, their weights and advantages: duplicates merged
    (``algos.merge_duplicate_rows``) when `merge` and the advantages are per row, else all of them."""
    if not merge or advantages.dim() != 1:
        return idx, None, advantages[idx]
    keys = torch.cat([batch.input_ids[idx], batch.attention_mask[idx], batch.completion_mask[idx].long()], 1)
    rows, weights, adv = merge_duplicate_rows(keys.cpu(), advantages[idx].cpu())
    device = advantages.device
    return idx[rows], weights.to(device), adv.to(device)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state (AdamW: two moments per trainable tensor)."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else float("nan")


@contextlib.contextmanager
def _progress(cfg: TrainConfig, steps):
    from tqdm.auto import tqdm

    bar = tqdm(steps, desc="rl", unit="step", disable=not cfg.progress, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard logging needs the 'tensorboard' package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tb"))
