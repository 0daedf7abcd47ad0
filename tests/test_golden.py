"""Golden runs: the first steps of three tiny training runs, compared with metrics checked in under
`tests/assets/golden/` (as torchtitan keeps `tests/assets/losses`).

Each run uses one CPU thread and torch's default matmul kernel everywhere (`ONELAYER_CPU_LINEAR=default`),
so the numbers do not depend on which kernel the machine measured faster. The RL steps then agree within
the tolerance on every machine tried (two AMD EPYC kinds and an Intel Xeon). The warm start does not: it
fine-tunes for hundreds of steps at torch's default threads, the BLAS takes other code paths on another
CPU, and the checkpoint differs (arith's step-1 reward 0.0625, 0.125 and 0.3125 on those three machines;
two of them both call themselves "AMD EPYC"). So a warm-started run's metrics are kept per warm-start
checkpoint (`by_warm_start`, keyed by the hash `eval.json` records), and a checkpoint with none recorded
skips with that reason; the run without a warm start (`grid_gigpo`) is checked on every machine. A
refactor must leave them unchanged; a change that is meant to alter training regenerates them on purpose,
on each kind of machine it can reach:

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
from onelayer.policy.kernels import cpu_model

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


def _run(name: str, out: Path) -> tuple[list[dict], str | None]:
    """The run's first steps and its warm start's hash (None without a warm start)."""
    env = {**os.environ, "ONELAYER_CPU_LINEAR": "default"}
    cmd = [sys.executable, "-m", "onelayer.cli", "train", "--out", str(out), *COMMON, *RUNS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = json.loads((out / "eval.json").read_text()).get("warm_start")
    steps = [{k: m[k] for k in ("step", *KEYS)} for m in read_jsonl(out / "metrics.jsonl")]
    return steps, None if warm is None else warm["hash"]


def _recorded(name: str) -> dict:
    path = ASSETS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {"args": COMMON + RUNS[name]}


def _expected(recorded: dict, warm: str | None) -> list[dict] | None:
    if warm is None:
        return recorded.get("steps")
    entry = recorded.get("by_warm_start", {}).get(warm)
    return None if entry is None else entry["steps"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_steps_match_the_golden_metrics(name, tmp_path, base_dir):
    recorded, update = _recorded(name), bool(os.environ.get("ONELAYER_UPDATE_GOLDEN"))
    assert recorded["args"] == COMMON + RUNS[name] or update, "the run's arguments changed: regenerate the golden file"
    got, warm = _run(name, tmp_path / name)
    if update:
        _record(name, recorded, got, warm)
        return
    want = _expected(recorded, warm)
    if want is None:
        pytest.skip(f"no golden metrics recorded for this machine's warm start (checkpoint {warm}, built on "
                    f"{cpu_model()!r}; recorded: {sorted(recorded.get('by_warm_start', {}))}): the warm start's "
                    "rounding differs between kinds of CPU; record them with ONELAYER_UPDATE_GOLDEN=1")
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), f"step {g['step']} {key}: {g[key]} != {w[key]}"


def _record(name: str, recorded: dict, got: list[dict], warm: str | None) -> None:
    keep = recorded if recorded["args"] == COMMON + RUNS[name] else {}
    new = {"args": COMMON + RUNS[name]}
    if warm is None:
        new["steps"] = got
    else:
        new["by_warm_start"] = {**keep.get("by_warm_start", {}), warm: {"cpu": cpu_model(), "steps": got}}
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / f"{name}.json").write_text(json.dumps(new, indent=1) + "\n")


def test_golden_metrics_are_looked_up_by_the_warm_start_hash():
    recorded = {"args": [], "by_warm_start": {"0123abcd": {"cpu": "Some CPU", "steps": []}}}
    assert _expected(recorded, "0123abcd") == []
    assert _expected(recorded, "ffffeeee") is None
    assert _expected({"args": [], "steps": [{"step": 1}]}, None) == [{"step": 1}]
