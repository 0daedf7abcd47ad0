"""Early stopping by a held-out train-split check: score the policy every few steps, keep the best weights.

RL on a small policy can improve for a while and then fall apart, and where it falls apart depends on
the seed, the thread count and the machine. With ``check_every`` set, the trainer sets aside
``check_items`` items of the *train* split (never sampled for RL, never the eval split), scores the
policy on them before training (step 0, the base) and every ``check_every`` steps, and with
``keep_best`` ends with the weights that scored best there (ties go to the earlier step), not the last
ones. The eval split stays untouched by the choice, so the final eval score is not biased by it.

On disk (so a killed run resumes with its checks): ``checks.json`` holds every check so far and
``best/`` the best weights (trainable tensors only) with their step and score. The trainer saves its
checkpoint before each check, so a resumed run never lacks the weights of a check it has recorded.
In a job over several processes the check's items are split over them (greedy single-turn scoring) or
scored by rank 0 (agent episodes), and every rank gets the same score, so all keep the same best.
"""

from __future__ import annotations

from pathlib import Path

from onelayer.io import atomic_write_json, read_json, replace_dir
from onelayer.train.checkpoint import load_trainable, save_trainable


def holdout(items: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """(items RL may sample, the check's items): the first `n` items are set aside, at most half of them."""
    n = min(n, len(items) // 2)
    return items[n:], items[:n]


def is_check_step(step: int, every: int, max_steps: int) -> bool:
    """Steps at which the policy is checked: 0 (the base), every `every` steps, and the last step."""
    return every > 0 and step <= max_steps and (step % every == 0 or step == max_steps)


class BestKeeper:
    """The checks of one run and the weights of its best one, kept under `out`. A job over several processes
    (`parallel`, `train.distributed`) has one in every rank, each recording the same scores (the check's are
    the whole job's): rank 0 writes the files (the weights gathered whole under FSDP), every rank restores."""

    def __init__(self, out: Path, parallel=None):
        self.parallel = parallel
        self.main = parallel is None or parallel.main
        self.checks_path, self.best_dir = out / "checks.json", out / "best"
        self.checks: list[dict] = read_json(self.checks_path) if self.checks_path.is_file() else []
        state = self.best_dir / "state.json"
        self.best: dict | None = read_json(state) if state.is_file() else None

    def checked(self, step: int) -> bool:
        return any(c["step"] == step for c in self.checks)

    def record(self, step: int, score: float, model) -> bool:
        """Record the check of the current weights at `step`; returns True when they are the new best."""
        improved = self.best is None or score > self.best["score"] or self.best["step"] == step
        if improved:
            tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")
            if self.main:
                tmp.mkdir(parents=True, exist_ok=True)
            save_trainable(tmp / "trainable.safetensors", model, self.parallel)
            self.best = {"step": step, "score": score}
            if self.main:
                atomic_write_json(tmp / "state.json", self.best)
                replace_dir(tmp, self.best_dir)
        self.checks = [c for c in self.checks if c["step"] != step] + [{"step": step, "score": score}]
        if self.main:
            atomic_write_json(self.checks_path, self.checks)
        if self.parallel is not None:
            self.parallel.barrier()  # best/ is whole before any rank may read it
        return improved

    def restore(self, model) -> None:
        """Put the best check's trainable tensors back into `model`."""
        load_trainable(self.best_dir / "trainable.safetensors", model, self.parallel)
