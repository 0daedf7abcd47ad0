"""Golden runs: the first steps of three tiny training runs, compared with metrics checked in under
`tests/assets/golden/` (as torchtitan keeps `tests/assets/losses`).

Each run uses one CPU thread and torch's default matmul kernel everywhere (`ONELAYER_CPU_LINEAR=default`),
so the numbers do not depend on which kernel the machine measured faster. A refactor must leave them
unchanged; a change that is meant to alter training regenerates them on purpose:

    ONELAYER_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and says why in its commit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onelayer.io import read_jsonl

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).parent / "assets" / "golden"
KEYS = ("reward_mean", "loss", "kl", "grad_norm")
STEPS = 4
COMMON = ["--threads", "1", "--seed", "0", "--max-steps", str(STEPS), "--no-progress", "--no-save-model",
          "--num-generations", "4", "--prompts-per-step", "4"]
RUNS = {
    # the warm-started tiny model (built by the session's `base_dir` fixture, or here on first use)
    "arith_grpo": ["--task", "arith", "--algo", "grpo", "--task-opt", "n_eval=200", "--beta", "0.02"],
    # warm-started too (~1 min once per cache): a random model writes no function that runs, so every reward is 0
    "pyfunc_dr_grpo": ["--task", "pyfunc", "--algo", "dr_grpo", "--task-opt", "n_eval=10", "--layers", "middle:1"],
    "grid_gigpo": ["--task", "grid", "--algo", "gigpo", "--task-opt", "n_eval=10", "--task-opt", "max_turns=4",
                   "--no-warm-start", "--check-every", "0"],
}
# float32 on one thread with one kernel: equal on one machine; the tolerance admits another CPU's rounding
RTOL, ATOL = 1e-4, 1e-6


def _metrics(name: str, out: Path) -> list[dict]:
    env = {**os.environ, "ONELAYER_CPU_LINEAR": "default"}
    cmd = [sys.executable, "-m", "onelayer.cli", "train", "--out", str(out), *COMMON, *RUNS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{k: m[k] for k in ("step", *KEYS)} for m in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_steps_match_the_golden_metrics(name, tmp_path, base_dir):
    got = _metrics(name, tmp_path / name)
    path = ASSETS / f"{name}.json"
    if os.environ.get("ONELAYER_UPDATE_GOLDEN"):
        ASSETS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": COMMON + RUNS[name], "metrics": got}, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert want["args"] == COMMON + RUNS[name], "the run's arguments changed: regenerate the golden file"
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want["metrics"]):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), f"step {g['step']} {key}: {g[key]} != {w[key]}"
