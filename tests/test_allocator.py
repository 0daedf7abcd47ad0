"""The CPU allocator setting: freed blocks stay in the process (no page faults on reuse), and it changes no
result of a training run."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from onelayer.train import allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# one child process per setting: the thresholds are process-wide and glibc's defaults cannot be restored
CHILD = r"""
import json, sys, torch
from onelayer.train import allocator
allocator.configure(sys.argv[1])
def step():  # like a training step: a few large buffers at once (8 MiB each), all freed at its end
    xs = [torch.empty(2 << 20) for _ in range(3)]
    for x in xs:
        x.fill_(1.0)  # touch every page
step()
before = allocator.minor_faults()
for _ in range(20):
    step()
print(json.dumps({"faults": allocator.minor_faults() - before, "note": allocator.note()}))
"""


def _child(choice: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, choice], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_retained_memory_is_reused_without_page_faults():
    retained, system = _child("retain"), _child("system")
    assert retained["note"].startswith("glibc") and "kept" in retained["note"]
    assert system["note"] == "system allocator"
    pages = 20 * 3 * (8 << 20) // 4096
    assert retained["faults"] < pages // 20, retained  # the buffers come back from the heap, already mapped
    # (glibc's default gives the freed top of the heap back to the OS when it is the top, which depends on
    # what else the process allocated: how often it faults is not asserted)
    assert system["faults"] >= 0


def test_configure_rejects_nothing_and_reports_what_it_did(monkeypatch):
    monkeypatch.setattr(allocator, "_STATE", {})
    assert allocator.configure("system") == "system allocator"
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.configure("retain").startswith("system allocator (not glibc")
    assert allocator.minor_faults() >= 0


@glibc
def test_a_training_run_is_bit_for_bit_the_same_with_either_setting(tmp_path):
    """The allocator only decides where freed memory goes: losses, gradients and scores must not change."""
    runs = {}
    for choice in ("retain", "system"):
        out = tmp_path / choice
        subprocess.run([sys.executable, "-m", "onelayer", "train", "--layers", "3", "--no-warm-start", "--max-steps", "2",
                        "--prompts-per-step", "4", "--num-generations", "4", "--task-opt", "n_eval=16", "--threads", "1",
                        "--cpu-allocator", choice, "--no-progress", "--no-save-model", "--out", str(out)],
                       check=True, capture_output=True, env={"ONELAYER_CACHE": str(tmp_path / "cache"), **_env()})
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        record = json.loads((out / "eval.json").read_text())
        assert "page_faults" in metrics[0]
        runs[choice] = ([(m["loss"], m["grad_norm"], m["reward_mean"]) for m in metrics], record["item_scores"],
                        record["cpu_memory"])
    assert runs["retain"][:2] == runs["system"][:2]
    assert "kept" in runs["retain"][2] and runs["system"][2] == "system allocator"


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "ONELAYER_CACHE"}


def test_torch_is_untouched_by_the_import():
    assert torch.get_num_threads() >= 1  # importing the module changes nothing until configure() runs
