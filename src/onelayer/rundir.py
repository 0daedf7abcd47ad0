"""The run directory: what `onelayer train --out DIR` owns on disk, shared by the trainer and the sweep.

A run directory holds config.json (with `config_hash`, the job's identity, and `resume_hash`, what a
resume must match: they differ by the process count), status.json, metrics.jsonl, eval.json,
checkpoint/ and model/ (plus error.txt when a sweep job failed). A sweep's job directory is exactly
one. A run is done only when its eval.json is on disk and its status says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from onelayer.config import ConfigError, identity_keys, resume_free_keys
from onelayer.io import atomic_write_json, read_json

RESUME_FREE_KEYS = resume_free_keys()
IDENTITY_KEYS = identity_keys()


def resume_hash(cfg) -> str:
    """A short hash of every setting a resume must keep (not the resume-free ones)."""
    return _hash({k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS})


def config_hash(cfg) -> str:
    """A short hash of every setting that changes the result: `resume_hash`'s, and the resume-free settings
    that are part of a job's identity (`config.identity_keys`: the process count) where they are not their
    defaults, so a default config keeps the hash it always had."""
    keep = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS}
    extra = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name in IDENTITY_KEYS and getattr(cfg, f.name) != f.default}
    return _hash({**keep, **extra})


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(cfg, out: Path) -> None:
    """A ConfigError if `out` already holds a run with a different config."""
    if (out / "config.json").is_file():
        saved = read_json(out / "config.json")
        # a run written before resume_hash was recorded: its config_hash left the process count out
        old, new_hash = saved.get("resume_hash") or saved.get("config_hash"), resume_hash(cfg)
        batch = [(k, saved.get(k), getattr(cfg, k, None)) for k in ("prompts_per_step", "num_generations")]
        if old and old != new_hash and any(new is not None and was not in (None, new) for _, was, new in batch):
            raise ConfigError(
                f"{out} was trained with a global batch of {batch[0][1]} prompts x {batch[1][1]} completions; a "
                f"resume needs the same (got {batch[0][2] or batch[0][1]} x {batch[1][2]}); any --nproc that divides it "
                "may resume it, or use a new --out directory"
            )
        if old and old != new_hash:
            raise ConfigError(
                f"{out} already holds a run with a different config; use a new --out directory "
                "or delete that one to start over"
            )


def status(out: Path) -> str:
    """The status.json status (running, failed, done, ...), or 'pending' before the run started."""
    path = Path(out) / "status.json"
    return read_json(path)["status"] if path.is_file() else "pending"


def is_done(out: Path) -> bool:
    """Finished: the status says so and eval.json is on disk."""
    return status(out) == "done" and (Path(out) / "eval.json").is_file()


def set_status(out: Path, status: str, **extra) -> None:
    atomic_write_json(Path(out) / "status.json", {"status": status, "time": time.time(), **extra})


def reset(out: Path) -> None:
    """Forget a run's progress (checkpoint, metrics, status, error) so it starts from scratch."""
    for name in ("checkpoint", "model"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "status.json", "error.txt", "base_eval.json", "eval.json", "attempts.json"):
        (out / name).unlink(missing_ok=True)


def cached_scores(path: Path, compute, write: bool = True) -> tuple[list, list | None]:
    """Per-item scores and answers (None for agent tasks, and in files written before answers were kept)
    saved once (unless not `write`: another process of the job does), so a resumed run does not re-evaluate
    the base. `compute()` returns (scores, answers)."""
    if path.is_file():
        saved = read_json(path)
        return saved["item_scores"], saved.get("item_answers")
    scores, answers = compute()
    if write:
        atomic_write_json(path, {"item_scores": scores, **({"item_answers": answers} if answers is not None else {})})
    return scores, answers
