"""Helpers shared by several test files: small randomly initialised Llama-family models, a seeded rollout on
them and closeness checks for log-probs and gradients (lean-path, prefix-reuse and benchmark tests); polling
for a condition, and the seed of random kill points (tests that kill a process); a fake finished sweep with
a given profile and tiny training settings (recipe and probe-validation tests)."""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from onelayer.policy import sequence_logprobs
from onelayer.rollout import sample

PAD, EOS, V = 0, 1, 60
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]
SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=V, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = {
        "qwen3": lambda: Qwen3Config(head_dim=16, **SHAPE),
        "qwen2": lambda: Qwen2Config(**SHAPE),  # biases on q/k/v
        "llama": lambda: LlamaConfig(**SHAPE),
    }[kind]()
    return AutoModelForCausalLM.from_config(cfg)



def rollout(model, capture=None, lean=True, seed=0):
    return sample(model, PROMPTS, num_generations=3, max_new_tokens=12, temperature=0.9, eos_id=EOS, pad_id=PAD,
                  generator=torch.Generator().manual_seed(seed), capture_block=capture, lean=lean)



def logprobs_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len, temperature=0.9, **kw)
    (lp * batch.completion_mask).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}



def assert_close(a, b, mask, tol=1e-5):
    assert (((a - b).abs() * mask).max().item()) < tol



def assert_grads_close(ga: dict, gb: dict, rel=1e-4):
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = ga[name].abs().max().item() + 1e-12
        assert (ga[name] - gb[name]).abs().max().item() / scale < rel, name



def poll_until(condition, timeout: float, interval: float = 0.01) -> bool:
    """Call ``condition`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def kill_seed() -> int:
    """The seed of a test's random kill point: ``$ONELAYER_KILL_SEED`` (to replay a failure, or to try other
    points), else 0, so that every run of the suite kills at the same points."""
    return int(os.environ.get("ONELAYER_KILL_SEED", "0"))


CONDITION = "tiny-qwen3/arith/grpo"
PROFILE = [0.56, 0.40, 0.30, 0.25, 0.20, 0.22, 0.18, 0.17]  # 8 blocks, best first, worst last
TINY = {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 4,
        "task_opts": {"n_eval": 8}, "warm_start": False, "threads": 1, "progress": False, "save_model": False}


def source_sweep(path, profile=PROFILE):
    """A finished sweep's two files the recipes read: contributions.csv and plan.json."""
    path.mkdir(parents=True, exist_ok=True)
    L = len(profile)
    (path / "contributions.csv").write_text("condition,layer,relative_depth,contribution\n" + "".join(
        f"{CONDITION},{i},{i / (L - 1)},{v}\n" for i, v in enumerate(profile)))
    (path / "plan.json").write_text(json.dumps({"spec": {"train": TINY}, "jobs": [
        {"id": "x", "condition": CONDITION, "layers": "all", "seed": 0}]}))
    return path
