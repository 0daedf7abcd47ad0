"""`onelayer eval`: score a model (built-in, local directory or hub name) on a task's eval split.

The score is the mean greedy score; the record keeps each item's score and answer (`Task.answer`). With
``samples=n`` > 1 it also samples n completions per item (at the config's temperature and top-p) and reports
pass@k for every k in ``pass_k`` up to n, by the unbiased estimator (``onelayer.stats.pass_at_k``); a sample
passes when it scores 1.0.
"""

from __future__ import annotations

from pathlib import Path

from onelayer import tasks
from onelayer.config import ConfigError, TrainConfig
from onelayer.io import atomic_write_json
from onelayer.stats import bootstrap_ci, mean_pass_at_k
from onelayer.tasks.agent import is_agent
from onelayer.train.evaluate import sampled_pass_counts, task_results
from onelayer.train.precision import Precision
from onelayer.train.setup import completion_budget, format_task, load_model, resolve_device, setup_torch


def prepare_eval(cfg: TrainConfig, task=None, log=print):
    """What scoring a model needs: (model, tokenizer, the task in its prompt format, the config with the format
    and completion budget filled in, precision). The model is frozen, in eval mode, cast to the config's
    precision; run generation under ``precision.autocast()``. `task`: ``cfg``'s task, if already made."""
    setup_torch(cfg)
    task = tasks.make(cfg.task, **cfg.task_opts) if task is None else task
    max_new = completion_budget(cfg, task)
    model, tok, source = load_model(cfg, task, max_new, resolve_device(cfg.device), log)
    task, cfg = format_task(cfg, task, tok, budget_given=cfg.max_completion_length is not None)
    precision = Precision.from_config(cfg.dtype, cfg.frozen_dtype, next(model.parameters()).device.type)
    model.requires_grad_(False)
    precision.apply(model)
    return model.eval(), tok, task, cfg, precision, source


def evaluate_model(cfg: TrainConfig, out: str | Path, *, batch_size: int = 256, samples: int = 1,
                   pass_k: tuple[int, ...] = (1, 10, 100), log=print) -> dict:
    task = tasks.make(cfg.task, **cfg.task_opts)
    if samples > 1 and is_agent(task):
        raise ConfigError(f"--samples applies to single-turn tasks; {cfg.task} is an agent task (its score is the "
                          "success rate over held-out seeds; set episodes per seed with --task-opt eval_samples=N)")
    model, tok, task, cfg, precision, source = prepare_eval(cfg, task, log)
    max_new = cfg.max_completion_length
    items = task.items("eval")
    with precision.autocast():
        scores, answers = task_results(model, tok, task, items, max_new_tokens=max_new, batch_size=batch_size)
    score = sum(scores) / len(scores)
    record = {"score": score, "ci95": bootstrap_ci(scores), "n": len(scores), "task": cfg.task,
              "task_options": task.options, "model": cfg.model, "model_source": str(source),
              "prompt_format": cfg.prompt_format,
              "item_ids": [it["id"] for it in items], "item_scores": scores,
              **({"item_answers": answers} if answers is not None else {})}
    log(f"score {score:.1%} 95% CI [{record['ci95'][0]:.1%}, {record['ci95'][1]:.1%}] on {len(scores)} items of {cfg.task}")
    if samples > 1:
        with precision.autocast():
            counts = sampled_pass_counts(model, tok, task, items, n=samples, max_new_tokens=max_new,
                                         temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                         batch_size=batch_size)
        ks = [k for k in pass_k if k <= samples]
        record.update(samples=samples, temperature=cfg.temperature, top_p=cfg.top_p, item_pass_counts=counts,
                      pass_at_k={str(k): mean_pass_at_k([(samples, c) for c in counts], k) for k in ks})
        log("sampled " + ", ".join(f"pass@{k} {v:.1%}" for k, v in record["pass_at_k"].items())
            + f" ({samples} samples per item, temperature {cfg.temperature:g})")
    atomic_write_json(out, record)
    return record
