"""`onelayer eval`: score a model (built-in, local directory or hub name) on a task's eval split."""

from __future__ import annotations

from pathlib import Path

from onelayer import tasks
from onelayer.config import TrainConfig
from onelayer.io import atomic_write_json
from onelayer.stats import bootstrap_ci
from onelayer.train.evaluate import greedy_scores
from onelayer.train.setup import completion_budget, load_model, resolve_device, setup_torch


def evaluate_model(cfg: TrainConfig, out: str | Path, *, batch_size: int = 256, log=print) -> dict:
    setup_torch(cfg)
    task = tasks.make(cfg.task, **cfg.task_opts)
    max_new = completion_budget(cfg, task)
    model, tok, source = load_model(cfg, task, max_new, resolve_device(cfg.device), log)
    items = task.items("eval")
    scores = greedy_scores(model.eval(), tok, task, items, max_new_tokens=max_new, batch_size=batch_size)
    score = sum(scores) / len(scores)
    record = {"score": score, "ci95": bootstrap_ci(scores), "n": len(scores), "task": cfg.task,
              "task_options": task.options, "model": cfg.model, "model_source": str(source),
              "item_ids": [it["id"] for it in items], "item_scores": scores}
    atomic_write_json(out, record)
    log(f"score {score:.1%} 95% CI [{record['ci95'][0]:.1%}, {record['ci95'][1]:.1%}] on {len(scores)} items of {cfg.task}")
    return record
