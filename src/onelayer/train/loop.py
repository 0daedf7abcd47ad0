"""The RL loop: one run of GRPO / Dr. GRPO / GiGPO that updates only the selected layers.

    state = setup(cfg, out)            # task, policy, layer selection, optimizer, resume, base eval
    for step in steps:
        metrics = rl_step(state, step) # rollout + reward -> advantages -> log-probs -> update
        after_step(state, step, metrics)  # log, collapse guard, checkpoint, train-split check
    record = finish(state)             # keep the best check, eval, eval.json, model/

Algorithm math lives in `onelayer.algos`, experience collection in `onelayer.train.experience`, the
update in `onelayer.train.update`, the run directory's files in `onelayer.rundir`. A job over several
processes runs this same loop in each; `onelayer.train.distributed` (`RunState.dp`) holds what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onelayer import rundir, tasks
from onelayer.algos import get_preset
from onelayer.config import ConfigError, TrainConfig
from onelayer.io import append_jsonl, atomic_write_json, read_json, read_jsonl, replace_dir, write_jsonl
from onelayer.models.layers import (
    block_lr_multipliers,
    copy_trainable,
    fingerprint_frozen,
    frozen_unchanged,
    param_groups,
    select_layers,
    trainable_parameters,
)
from onelayer.models.prefix import reuse_block
from onelayer.policy import forward_path, fused, fused_ops, kernels, sequence_block_input, sequence_logprobs
from onelayer.stats import bootstrap_ci, paired_bootstrap_ci
from onelayer.tasks.agent import is_agent
from onelayer.tasks.prompts import TRAINED_FORMAT_FILE
from onelayer.train import allocator
from onelayer.train.checkpoint import load_checkpoint, save_checkpoint
from onelayer.train.collapse import CollapseRule, check_collapse
from onelayer.train.collapse import describe as describe_collapse
from onelayer.train.distributed import Parallel
from onelayer.train.distributed import check as check_parallel
from onelayer.train.distributed import init as init_parallel
from onelayer.train.evaluate import task_results
from onelayer.train.experience import advantages as step_advantages
from onelayer.train.experience import collect
from onelayer.train.precision import Precision
from onelayer.train.selection import BestKeeper, holdout, is_check_step
from onelayer.train.setup import (
    check_backend,
    format_task,
    load_model,
    resolve_device,
    rollout_sampler,
    setup_torch,
    with_task_defaults,
)
from onelayer.train.update import TrainingError, optimizer_state_bytes, update, warmup_lr
from onelayer.train.warmstart import warm_start_info


@dataclass
class RunState:
    """Everything one run holds between its steps."""

    cfg: TrainConfig  # with the task's defaults and the prompt format filled in
    user_cfg: TrainConfig  # as given (its hash identifies the run)
    out: Path
    log: object
    task: object
    model: object
    tok: object
    source: object
    device: str
    algo: dict  # the preset's choices after overrides: advantage, scale, loss_agg, beta
    block_lr: dict  # trainable block -> its learning rate (after --layer-lr multipliers)
    selection: object
    precision: Precision
    forward: str
    fingerprint: dict
    ref_weights: dict | None
    reuse_at: int | None
    sampler: object  # `onelayer.rollout.sampler.Sampler`
    params: list
    optimizer: torch.optim.Optimizer | None
    train_items: list
    eval_items: list
    check_items: list
    keeper: BestKeeper | None
    writer: object
    start_step: int
    base_scores: list
    base_answers: list | None  # None for agent tasks (and a base scored before answers were kept)
    history: list
    rule: CollapseRule
    collapse: dict | None
    elapsed: float
    dp: Parallel = field(default_factory=Parallel)  # this process's place in the job (one process: Parallel())
    started: float = field(default_factory=time.perf_counter)

    @property
    def steps(self) -> range:
        return range(self.start_step, self.cfg.max_steps) if self.optimizer is not None else range(0)


def run(cfg: TrainConfig, out: str | Path, log=print) -> dict:
    """Train according to `cfg`, writing everything under `out`; returns the eval record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rundir.is_done(out):
        log(f"{out} is already done; not training again (remove it to rerun)")
        return read_json(out / "eval.json")
    state = setup(cfg, out, log)
    with _progress(state.cfg, state.steps, show=state.dp.main) as bar:
        for step in bar:
            metrics = rl_step(state, step)
            after_step(state, step, metrics)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}",
                            **({"check": f"{state.keeper.checks[-1]['score']:.1%}"}
                               if state.keeper and state.keeper.checks else {}))
    record = finish(state)
    state.dp.close()
    return record


def setup(cfg: TrainConfig, out: Path, log=print) -> RunState:
    """Load the task and the policy, select the layers, resume from a checkpoint, and score the base."""
    started = time.perf_counter()
    rundir.check_resumable(cfg, out)
    setup_torch(cfg)
    dp, device = init_parallel(cfg, resolve_device(cfg.device))  # one process, or this rank of a torchrun job
    log = log if dp.main else _quiet
    task = tasks.make(cfg.task, **cfg.task_opts)
    user_cfg, cfg = cfg, with_task_defaults(cfg, task)  # unset settings take the task's suggestions
    check_parallel(cfg, dp.world, device)
    # as run (torchrun's count): resume-free, in the config hash when > 1 (`rundir.config_hash`)
    user_cfg, cfg = (dataclasses.replace(c, nproc=dp.world) for c in (user_cfg, cfg))
    algo = resolve_algo(cfg)
    check_backend(cfg)
    model, tok, source = load_model(cfg, task, cfg.max_completion_length, device, log)
    # prompts for this model: raw, few-shot or chat (a chat reply gets a longer default budget)
    task, cfg = format_task(cfg, task, tok, budget_given=user_cfg.max_completion_length is not None)

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
    log(f"precision: {precision.describe()}; forward: {forward}; CPU memory: {allocator.note()}")
    fingerprint = fingerprint_frozen(model)
    # frozen-prefix reuse: with blocks 0..l-1 and the embeddings frozen, the hidden states entering block l
    # are computed once per batch (captured during the rollout) and every later forward starts at block l
    reuse_at = reuse_block(model, cfg.block_path) if cfg.prefix_reuse else None
    if dp.active:  # DDP or FSDP around the policy: its layers are selected, no training forward has run yet
        forward, reuse_at = dp.parallelize(model, cfg, precision, forward, reuse_at, beta=algo["beta"], log=log)
    # one copy of the trainable blocks only (under FSDP this rank's shards of them)
    ref_weights = copy_trainable(model) if algo["beta"] > 0 else None
    if reuse_at is not None:
        log(f"frozen-prefix reuse: log-prob and update forwards start at block {reuse_at}")
    sampler = rollout_sampler(cfg, model, tok, source, out)
    params = trainable_parameters(model)
    # per trainable block: its rate's multiplier
    block_mult = block_lr_multipliers(selection.indices, selection.num_layers, cfg.layer_lr, cfg.layers)
    # fused: one pass over each tensor instead of a dozen (plain tensors; FSDP's sharded ones take the default)
    optimizer = torch.optim.AdamW(param_groups(model, selection, block_mult), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, fused=dp.method != "fsdp") if params else None
    block_lr = {i: cfg.learning_rate * m for i, m in block_mult.items()}
    if dp.main:
        atomic_write_json(out / "config.json", {
        **cfg.to_dict(), "scale_rewards": algo["scale"], "loss_type": algo["loss_agg"], "beta": algo["beta"],
        "advantage": algo["advantage"], "model_source": str(source), "layer_indices": selection.indices,
        "num_layers": selection.num_layers, "trainable_params": selection.trainable_params,
        "total_params": selection.total_params, "task_options": task.options,
        "config_hash": rundir.config_hash(user_cfg), "resume_hash": rundir.resume_hash(user_cfg),
        "precision": precision.describe(), "forward": forward, "cpu_memory": allocator.note(), "block_lr": block_lr,
        **({"parallel": dp.describe()} if dp.active else {})})
        rundir.set_status(out, "running")

    start_step = 0
    if optimizer is not None and (saved := load_checkpoint(out / "checkpoint", model, optimizer, parallel=dp)):
        start_step = saved["step"]
        log(f"resuming from the checkpoint at step {start_step}")
    if dp.main:
        write_jsonl(out / "metrics.jsonl", [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] <= start_step])
    dp.barrier()  # every rank reads the truncated metrics
    train_items, eval_items = task.items("train"), task.items("eval")
    # early stopping: a slice of the train split, never sampled for RL, scores the policy every few steps
    keeper, check_items = None, []
    if cfg.check_every and optimizer is not None:
        train_items, check_items = holdout(train_items, cfg.check_items)
        keeper = BestKeeper(out, parallel=dp)
    history = read_jsonl(out / "metrics.jsonl")  # every step's metrics so far, for the collapse guard
    rule = CollapseRule(window=cfg.collapse_window, fraction=cfg.collapse_fraction, patience=cfg.collapse_window)
    state = RunState(
        cfg=cfg, user_cfg=user_cfg, out=out, log=log, task=task, model=model, tok=tok, source=source, device=device,
        algo=algo, block_lr=block_lr, selection=selection, precision=precision, forward=forward, fingerprint=fingerprint,
        ref_weights=ref_weights, reuse_at=reuse_at, sampler=sampler, params=params, optimizer=optimizer,
        train_items=train_items, eval_items=eval_items, check_items=check_items, keeper=keeper,
        writer=None, start_step=start_step, base_scores=[], base_answers=None, history=history, rule=rule,
        collapse=check_collapse(history, rule), elapsed=sum(m.get("seconds", 0.0) for m in history), dp=dp,
        started=started)
    state.base_scores, state.base_answers = rundir.cached_scores(out / "base_eval.json",
                                                                 lambda: evaluate_answers(state, eval_items),
                                                                 write=dp.main)
    log(f"base score {_mean(state.base_scores):.1%} on {len(eval_items)} eval items")
    state.writer = _tensorboard(out) if cfg.tensorboard and dp.main else None
    check(state, start_step)  # the base (step 0), or a check a killed run had not recorded yet
    return state


def rl_step(s: RunState, step: int) -> dict:
    """One RL step: sample and score, advantages, reference log-probs, update. Returns the step's metrics."""
    cfg = s.cfg
    t0, faults0 = time.perf_counter(), allocator.minor_faults()
    for group in s.optimizer.param_groups:
        group["lr"] = warmup_lr(cfg.learning_rate, step, cfg.warmup_steps) * group["lr_mult"]
    rng = random.Random(cfg.seed * 1_000_003 + step)
    gen = torch.Generator().manual_seed(s.dp.rollout_seed(cfg.seed * 1_000_003 + step))  # rank 0: the 1-process one
    # every rank draws the step's prompts alike and rolls out its share (whole groups)
    items = s.dp.shard(rng.sample(s.train_items, min(cfg.prompts_per_step, len(s.train_items))))

    # rollout + reward: G completions per prompt (G episodes per seed for agent tasks), with the behaviour
    # log-probs for the ratio, then advantages
    s.sampler.sync_weights(s.model)  # a sampler with its own weights (vLLM) takes the updated ones
    with s.precision.autocast(), s.dp.full_weights(s.model):
        exp = collect(s.model.eval(), s.tok, s.task, items, num_generations=cfg.num_generations,
                      max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                      generator=gen, sample_fn=s.sampler, block_path=cfg.block_path,
                      capture_block=s.reuse_at if s.sampler.captures_hidden_states else None)
    batch = exp.batch
    # over the whole step's rows (every rank's), this rank's rows of them
    advantages = s.dp.advantages(exp, lambda e: step_advantages(e, get_preset(cfg.algo), s.algo["scale"],
                                 cfg.balance_episodes, estimator=s.algo["advantage"])).to(s.device)
    t2 = time.perf_counter()

    # log-probs: the frozen prefix's output (unless the rollout captured it), then the reference's
    hidden = batch.block_input
    if s.reuse_at is not None and hidden is None:
        with s.precision.autocast():
            hidden = sequence_block_input(s.model, batch.input_ids, batch.attention_mask, s.reuse_at, cfg.block_path)

    def logprobs(idx):  # float32 log-probs; the forward under autocast when mixed
        start = {} if s.reuse_at is None else {"block_input": hidden[idx], "block_index": s.reuse_at,
                                               "block_path": cfg.block_path}
        with s.precision.autocast():
            return sequence_logprobs(s.model, batch.input_ids[idx], batch.attention_mask[idx], batch.prompt_len,
                                     temperature=cfg.temperature, prompt_index=batch.prompt_index[idx], **start)

    ref_logp = None
    if s.ref_weights is not None:
        with torch.no_grad(), s.dp.reference(s.model, s.ref_weights):
            ref_logp = logprobs(slice(None))
    t3 = time.perf_counter()

    s.model.train()
    try:
        stats = update(cfg, s.optimizer, s.params, batch, advantages, s.dp.forward(logprobs), ref_logp,
                       loss_agg=s.algo["loss_agg"], beta=s.algo["beta"], norm_len=cfg.max_completion_length, generator=gen,
                       parallel=s.dp)
    except TrainingError as exc:
        if s.dp.main:
            rundir.set_status(s.out, "failed", error=f"{exc} at step {step}")
        raise TrainingError(f"{exc} at step {step}; the last checkpoint (every {cfg.save_every} steps) and "
                            f"metrics.jsonl are kept in {s.out}. Try a lower learning_rate or check the reward "
                            "function for NaN/inf.") from None
    t4 = time.perf_counter()
    s.elapsed += t4 - t0
    return s.dp.metrics({
        "step": step + 1, **exp.metrics, **stats, "completion_len": batch.completion_lengths.float().mean().item(),
        "seconds": t4 - t0, "logprob_s": t3 - t2, "update_s": t4 - t3, "elapsed_s": s.elapsed,
        "page_faults": allocator.minor_faults() - faults0,
        "optimizer_bytes": optimizer_state_bytes(s.optimizer)})  # several processes: the whole job's


def after_step(s: RunState, step: int, metrics: dict) -> None:
    """Log the step's metrics, watch for a collapse, checkpoint, and run the train-split check when due."""
    cfg, done = s.cfg, step + 1
    if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
        metrics["eval_score"] = _mean(evaluate(s, s.eval_items))
    if s.dp.main:
        append_jsonl(s.out / "metrics.jsonl", metrics)
    s.history.append(metrics)
    if s.collapse is None and (collapse := check_collapse(s.history, s.rule)) is not None:
        s.collapse = collapse
        s.log(f"warning: {describe_collapse(collapse)}; eval.json will record collapsed: true")
    if s.writer is not None:
        for k, v in metrics.items():
            s.writer.add_scalar(f"train/{k}", v, done)
    checked = s.keeper is not None and is_check_step(done, cfg.check_every, cfg.max_steps)
    if done % cfg.save_every == 0 or done == cfg.max_steps or checked:
        # saved before the check, so a resumed run has the weights of every check it recorded
        save_checkpoint(s.out / "checkpoint", s.model, s.optimizer,
                        {"step": done, "config_hash": rundir.config_hash(s.user_cfg)}, parallel=s.dp)
    if checked:
        check(s, done)


def finish(s: RunState) -> dict:
    """Keep the best check's weights (if asked), score the eval split, and write eval.json and model/."""
    cfg = s.cfg
    selected = cfg.max_steps if s.optimizer is not None else 0
    if s.keeper is not None and cfg.keep_best and s.keeper.best and s.keeper.best["step"] != selected:
        s.keeper.restore(s.model)
        last = next((c["score"] for c in s.keeper.checks if c["step"] == selected), float("nan"))
        s.log(f"keeping the weights of step {s.keeper.best['step']}: train-split check {s.keeper.best['score']:.1%} "
              f"vs {last:.1%} at step {selected} ({len(s.check_items)} held-out train items; the eval split is not used)")
        selected = s.keeper.best["step"]
    scores, answers = evaluate_answers(s, s.eval_items)
    full = s.dp.full_state_dict(s.model)  # FSDP: every tensor gathered on rank 0 (the frozen check, model/)
    record = _record(s, scores, selected, answers, full) if s.dp.main else None
    if s.writer is not None:
        s.writer.add_scalar("eval/score", record["score"], cfg.max_steps)
        s.writer.close()
    if cfg.save_model:
        tmp = s.out / ".model.tmp"
        s.dp.save_pretrained(s.model, tmp, full)  # rank 0 writes
        if s.dp.main:
            s.tok.save_pretrained(tmp)
            atomic_write_json(tmp / TRAINED_FORMAT_FILE, {"prompt_format": cfg.prompt_format})  # eval's default
            replace_dir(tmp, s.out / "model")
    if not s.dp.main:
        return s.dp.broadcast(record)
    atomic_write_json(s.out / "eval.json", record)
    rundir.set_status(s.out, "done")
    s.log(f"cpu kernels: {kernels.summary()}")
    s.log(f"score {record['score']:.1%} (base {record['base_score']:.1%}), gain {record['gain']:+.1%} "
          f"95% CI [{record['gain_ci95'][0]:+.1%}, {record['gain_ci95'][1]:+.1%}]; "
          f"frozen tensors unchanged: {record['frozen_unchanged']}")
    return s.dp.broadcast(record)


def resolve_algo(cfg: TrainConfig) -> dict:
    """The algorithm preset's choices with the config's overrides applied."""
    preset = get_preset(cfg.algo)
    return {"advantage": cfg.advantage or preset.advantage, "scale": cfg.scale_rewards or preset.scale,
            "loss_agg": cfg.loss_type or preset.loss_agg, "beta": preset.beta if cfg.beta is None else cfg.beta}


def evaluate(s: RunState, items: list[dict]) -> list[float]:
    """Per-item scores of the current policy on `items` (eval split or the train-split check)."""
    return evaluate_answers(s, items)[0]


def evaluate_answers(s: RunState, items: list[dict]) -> tuple[list[float], list[str] | None]:
    """Per-item scores and answers (`Task.answer`; None for agent tasks) of the current policy on `items`;
    several processes share greedy single-turn items (agent episodes run on rank 0)."""
    def results(part: list[dict]) -> list[tuple]:
        scores, answers = task_results(s.model.eval(), s.tok, s.task, part, max_new_tokens=s.cfg.max_completion_length)
        return list(zip(scores, answers if answers is not None else [None] * len(scores)))

    with s.precision.autocast(), s.dp.full_weights(s.model):
        pairs = s.dp.scores(results, items, shardable=not is_agent(s.task))
    answers = [a for _, a in pairs]
    return [sc for sc, _ in pairs], (None if is_agent(s.task) else answers)


def check(s: RunState, step: int) -> float | None:
    """The train-split check at `step`, if one is due there and not recorded yet."""
    if s.keeper is None or not is_check_step(step, s.cfg.check_every, s.cfg.max_steps) or s.keeper.checked(step):
        return None
    score = _mean(evaluate(s, s.check_items))
    s.keeper.record(step, score, s.model)
    if s.writer is not None:
        s.writer.add_scalar("check/score", score, step)
    return score


def _record(s: RunState, scores: list[float], selected: int, answers: list[str] | None = None,
            full: dict | None = None) -> dict:
    cfg, sel, base = s.cfg, s.selection, s.base_scores
    unchanged, changed = frozen_unchanged(s.model, s.fingerprint, tensors=full)
    return {
        "score": _mean(scores), "ci95": bootstrap_ci(scores), "n": len(scores),
        "task": cfg.task, "task_options": s.task.options, "model": cfg.model, "algo": cfg.algo, "seed": cfg.seed,
        "layers": cfg.layers, "layer_indices": sel.indices, "num_layers": sel.num_layers,
        "prompt_format": cfg.prompt_format, "precision": s.precision.describe(), "forward": s.forward,
        **({"parallel": s.dp.describe()} if s.dp.active else {}),
        "trainable_params": sel.trainable_params, "total_params": sel.total_params,
        "learning_rate": cfg.learning_rate, "block_lr": s.block_lr,
        "base_score": _mean(base), "base_ci95": bootstrap_ci(base),
        "gain": _mean(scores) - _mean(base), "gain_ci95": paired_bootstrap_ci(scores, base),
        "frozen_unchanged": unchanged, "frozen_changed": changed, "cpu_kernels": kernels.choices(),
        "decode_step": fused.choices(), "train_ops": fused_ops.choices(), "cpu_memory": allocator.note(),
        "collapsed": s.collapse is not None, "collapse": s.collapse,
        "warm_start": warm_start_info(s.source) if (Path(str(s.source)) / "warmstart.json").is_file() else None,
        "steps": cfg.max_steps if s.optimizer is not None else 0, "train_seconds": round(s.elapsed, 2),
        "wall_seconds": round(time.perf_counter() - s.started, 2),  # this process: setup, evals, checks, training
        "selected_step": selected, "checks": s.keeper.checks if s.keeper is not None else [],
        "check_items": len(s.check_items),
        "item_ids": [it["id"] for it in s.eval_items], "item_scores": scores, "base_item_scores": base,
        # the answers a majority vote compares (`Task.answer`), aligned with item_ids; none for agent tasks
        **({"item_answers": answers} if answers is not None else {}),
        **({"base_item_answers": s.base_answers} if s.base_answers is not None else {}),
    }


def _mean(xs) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else float("nan")


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job."""


@contextlib.contextmanager
def _progress(cfg: TrainConfig, steps, show: bool = True):
    from tqdm.auto import tqdm

    bar = tqdm(steps, desc="rl", unit="step", disable=not cfg.progress or not show, dynamic_ncols=True, leave=False)
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
