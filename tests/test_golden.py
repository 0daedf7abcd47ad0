"""Golden runs: the first steps of three tiny training runs, compared with metrics checked in under
`tests/assets/golden/` (as torchtitan keeps `tests/assets/losses`).

Each run uses one CPU thread and torch's default matmul kernel everywhere (`ONELAYER_CPU_LINEAR=default`),
so the numbers do not depend on which kernel the machine measured faster. They do depend on the kind of
CPU: the BLAS takes other code paths on another CPU, the warm start's fine-tuning amplifies the rounding,
and the first rollout samples other tokens (arith's step-1 reward 0.3125 on an Intel Xeon against 0.0625
on AMD EPYC). So the metrics are kept per CPU model (`by_cpu`), and a CPU with none recorded skips with
that reason. A refactor must leave them unchanged; a change that is meant to alter training regenerates
them on purpose, on each kind of machine it can reach:

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


def _metrics(name: str, out: Path) -> list[dict]:
    env = {**os.environ, "ONELAYER_CPU_LINEAR": "default"}
    cmd = [sys.executable, "-m", "onelayer.cli", "train", "--out", str(out), *COMMON, *RUNS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{k: m[k] for k in ("step", *KEYS)} for m in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_steps_match_the_golden_metrics(name, tmp_path, base_dir):
    path, cpu, update = ASSETS / f"{name}.json", cpu_model(), bool(os.environ.get("ONELAYER_UPDATE_GOLDEN"))
    recorded = json.loads(path.read_text()) if path.is_file() else {"args": COMMON + RUNS[name], "by_cpu": {}}
    assert recorded["args"] == COMMON + RUNS[name] or update, "the run's arguments changed: regenerate the golden file"
    if cpu not in recorded["by_cpu"] and not update:
        pytest.skip(f"no golden metrics recorded on this CPU ({cpu!r}; recorded: {sorted(recorded['by_cpu'])}): "
                    "record them with ONELAYER_UPDATE_GOLDEN=1")
    got = _metrics(name, tmp_path / name)
    if update:
        ASSETS.mkdir(parents=True, exist_ok=True)
        by_cpu = recorded["by_cpu"] if recorded["args"] == COMMON + RUNS[name] else {}
        path.write_text(json.dumps({"args": COMMON + RUNS[name], "by_cpu": {**by_cpu, cpu: got}}, indent=1) + "\n")
        return
    want = recorded["by_cpu"][cpu]
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], rel=RTOL, abs=ATOL), f"step {g['step']} {key}: {g[key]} != {w[key]}"


def test_a_cpu_without_golden_metrics_skips_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "cpu_model", lambda: "Some Other CPU")
    with pytest.raises(pytest.skip.Exception, match="no golden metrics recorded on this CPU .'Some Other CPU'"):
        test_first_steps_match_the_golden_metrics("grid_gigpo", tmp_path, None)
