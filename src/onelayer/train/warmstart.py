"""Supervised warm start of the built-in tiny models, cached on disk.

RL cannot improve a random-weight model: with no correct samples every advantage is zero. So before RL,
a built-in model is fine-tuned on the task's demonstrations (prompt → correct completion) and stopped
as soon as its held-out score (greedy accuracy; success rate for agent tasks) enters a band that leaves
RL room to improve (for `arith`, stop at ≥ 30 % and accept anything in 15–60 %). The held-out items
are a slice of the *train* split kept out of fine-tuning, so the eval split stays untouched. The result is
an ordinary `save_pretrained` directory under ``$ONELAYER_CACHE`` (default ``~/.cache/onelayer``), keyed
by model, task options and settings, and reused by every later run; a file lock makes concurrent sweep
workers build it once.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from onelayer.io import atomic_write_json, build_once, cache_root
from onelayer.models import build_tiny
from onelayer.rollout import encode_prompts
from onelayer.train.evaluate import task_scores

WARM_VERSION = 3  # bump when the fine-tuning procedure changes, so cached results are rebuilt


class WarmStartError(RuntimeError):
    """The warm start could not bring the model into its accuracy band."""


@dataclass(frozen=True)
class WarmStartSettings:
    band: tuple[float, float] = (0.15, 0.60)  # accept a base accuracy in this range
    target: float = 0.30                       # stop at the first check at or above this
    learning_rate: float = 1e-3
    batch_size: int = 64
    check_every: int = 25
    n_heldout: int = 200
    max_steps: int = 3000  # a step budget, not a time limit, so the result never depends on machine load
    seed: int = 0


def settings_for(task) -> WarmStartSettings:
    """Tasks may tune the band via a `warm_start` attribute (a dict of WarmStartSettings fields)."""
    return WarmStartSettings(**task.warm_start)


def cache_dir(model_name: str, task, settings: WarmStartSettings) -> Path:
    key = json.dumps(
        {"v": WARM_VERSION, "model": model_name, "task": task.name, "opts": task.options, "settings": asdict(settings)},
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "warmstart" / f"{model_name}-{task.name}-{digest}"


def warm_started(model_name: str, task, *, max_new_tokens: int, log=print) -> Path:
    """Path of the warm-started checkpoint for (model, task), building it on first use."""
    settings = settings_for(task)
    final = cache_dir(model_name, task, settings)

    def build(tmp: Path) -> None:
        log(f"warm start: fine-tuning {model_name} on {task.name} demonstrations (once; cached in {final})")
        model, tok, record = _fine_tune(model_name, task, settings, max_new_tokens=max_new_tokens, log=log)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "warmstart.json", record)

    return build_once(final, "warmstart.json", build)


def warm_start_info(path: str | Path) -> dict:
    """What a run started from: the warm-start checkpoint's SHA-256 (of its weights file, first 16 hex
    digits), its held-out accuracy and steps. Recorded in every warm-started job's eval.json, so two
    sweeps that differ because their warm starts differ can be told apart."""
    path = Path(path)
    record = json.loads((path / "warmstart.json").read_text())
    h = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        h.update(weights.read_bytes())
    return {"hash": h.hexdigest()[:16], "heldout_accuracy": record["heldout_accuracy"], "steps": record["steps"],
            "path": str(path)}


def _sft_batch(tok, pairs: list[tuple[str, str]]):
    """Right-padded prompt+demonstration+EOS sequences with labels only on the completion."""
    prompts = encode_prompts(tok, [p for p, _ in pairs])
    demos = encode_prompts(tok, [d for _, d in pairs])
    seqs = [p + d + [tok.eos_token_id] for p, d in zip(prompts, demos)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    return ids, mask, labels


def _fine_tune(model_name: str, task, s: WarmStartSettings, *, max_new_tokens: int, log):
    model, tok = build_tiny(model_name, seed=s.seed)
    items = task.items("train")
    rng = random.Random(s.seed)
    rng.shuffle(items)
    heldout, train = items[: s.n_heldout], task.sft_pairs(items[s.n_heldout :])
    if len(heldout) < s.n_heldout or len(train) < s.batch_size:
        raise WarmStartError(f"task {task.name!r} has too few train items with demonstrations for the warm start "
                             f"({len(items)} items, {len(train)} demonstration pairs)")
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=0.0)
    lo, hi = s.band
    start, step, acc, prev = time.monotonic(), 0, 0.0, None
    history = []
    while True:
        model.train()
        for _ in range(s.check_every):
            batch = [train[rng.randrange(len(train))] for _ in range(s.batch_size)]
            ids, mask, labels = _sft_batch(tok, batch)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        model.eval()
        acc = sum(task_scores(model, tok, task, heldout, max_new_tokens=max_new_tokens)) / len(heldout)
        elapsed = time.monotonic() - start
        history.append({"step": step, "loss": loss.item(), "heldout_accuracy": acc, "seconds": round(elapsed, 1)})
        log(f"warm start: step {step} loss {loss.item():.3f} held-out score {acc:.1%} ({elapsed:.0f}s)")
        if acc >= s.target:
            if acc > hi and prev is not None and prev[0] >= lo:  # overshot: the previous check was in band
                acc = prev[0]
                model.load_state_dict(prev[1])
            break
        prev = (acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if step >= s.max_steps:
            if acc >= lo:
                break
            raise WarmStartError(
                f"warm start of {model_name} on {task.name} reached only {acc:.1%} held-out accuracy after "
                f"{step} steps (band {lo:.0%}-{hi:.0%}); try an easier task option (e.g. --task-opt difficulty=1)"
            )
    if not lo <= acc <= hi:
        raise WarmStartError(f"warm start ended at {acc:.1%} held-out accuracy, outside the band {lo:.0%}-{hi:.0%}")
    record = {"model": model_name, "task": task.name, "task_options": task.options, "settings": asdict(s),
              "heldout_accuracy": acc, "steps": step, "seconds": round(time.monotonic() - start, 1), "history": history}
    log(f"warm start: done, held-out score {acc:.1%} after {step} steps")
    return model, tok, record
