"""One benchmark run of one tool (onelayer or TRL's `GRPOTrainer`) in its own subprocess, and what it measures.

Every (tool, model, layers) run is its own subprocess (`python -m onelayer.bench`, which calls
`worker_main`), so one run's allocator state, threads or peak memory cannot leak into the next. Both tools
train with temperature 1, top-p 1, the same learning rate, beta 0, one update pass over the whole batch,
GRPO loss and group-scaled advantages. Step times are those after warm-up (the driver takes their medians):
onelayer's come from its own `metrics.jsonl` (per phase: rollout, reward, logprob, update), TRL's from a
callback around each optimizer step (generation, reward, loss, backward, optimizer), which leaves TRL's
between-step logging out of its time. Peak memory is the worker's peak resident set on CPU (`ru_maxrss`:
process-wide, so it includes the interpreter and libraries, the same for every run) or
`torch.cuda.max_memory_allocated` on GPU; optimizer-state bytes are summed over the optimizer's state
tensors.

A run over N processes (`onelayer bench --nproc N`) starts its worker with torchrun: every rank trains its
share of the same global batch (`onelayer.train.distributed`), rank 0 writes the result; its step time
is the slowest rank's.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from onelayer.bench.spec import BenchError, BenchSpec, bench_task, register_bench_task, task_options, trl_digit_reward


def _peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@contextlib.contextmanager
def _run_dir():
    """A temporary run directory, the same one for every process of a torchrun job (named by torchrun's run id)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        with tempfile.TemporaryDirectory() as out:
            yield out
        return
    out = Path(tempfile.gettempdir()) / f"onelayer-bench-{os.environ['TORCHELASTIC_RUN_ID']}"
    try:
        yield str(out)
    finally:
        if os.environ.get("RANK", "0") == "0":  # the others are done: the job's last step is a barrier
            shutil.rmtree(out, ignore_errors=True)


def _onelayer_worker(spec: BenchSpec, model_dir: str, device: str) -> dict:
    from onelayer.config import TrainConfig
    from onelayer.io import read_jsonl
    from onelayer.train.loop import run

    register_bench_task()
    # prompt_format raw: the task's prompts are already rendered in spec.prompt_format (see bench_task)
    cfg = TrainConfig(
        model=model_dir, task="_bench_digits", task_opts={**task_options(spec), "n_eval": spec.prompts},
        prompt_format="raw", layers=spec.layers, warm_start=False, prompts_per_step=spec.prompts,
        num_generations=spec.num_generations, max_completion_length=spec.max_new_tokens,
        learning_rate=spec.learning_rate, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0,
        max_steps=spec.warmup + spec.steps, save_every=10**9, save_model=False, progress=False,
        threads=spec.threads, seed=spec.seed, device=device,
    )
    with _run_dir() as out:
        record = run(cfg, out, log=lambda *_: None)
        rows = read_jsonl(Path(out) / "metrics.jsonl")[spec.warmup:]
    if os.environ.get("RANK", "0") != "0":
        return {}  # rank 0 reports the job's metrics
    phases = ("rollout_s", "reward_s", "logprob_s", "update_s")
    return {
        "step_s": [r["seconds"] for r in rows],
        "phases_s": {p[:-2]: [r[p] for r in rows] for p in phases},
        "completion_len": [r["completion_len"] for r in rows],
        "page_faults": [r.get("page_faults", 0) for r in rows],
        "cpu_memory": record.get("cpu_memory"),
        "optimizer_bytes": rows[-1]["optimizer_bytes"],
        "trainable_params": record["trainable_params"],
        "peak_memory_bytes": _peak_memory_bytes(device),
        "cpu_kernels": record.get("cpu_kernels", {}),
        "decode_step": record.get("decode_step", {}),
        "train_ops": record.get("train_ops", {}),
    }


def _trl_worker(spec: BenchSpec, model_dir: str, device: str) -> dict:
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise BenchError(f"TRL is needed for the comparison ({e}); install it with pip install 'onelayer[bench]'") from None
    from onelayer.models.layers import select_layers
    from onelayer.train import allocator
    from onelayer.train.update import optimizer_state_bytes

    allocator.configure(spec.trl_allocator)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # the same selection rule as onelayer: `all` trains everything, a block spec only those blocks
    sel = select_layers(model, spec.layers, train_non_block=spec.layers == "all")
    n_steps = spec.warmup + spec.steps
    items = bench_task(spec).items("train")[: spec.prompts * n_steps]  # in order: TRL does not shuffle here
    data = Dataset.from_list([{"prompt": it["prompt"]} for it in items])

    times: list[float] = []
    faults: list[int] = []
    lengths: list[float] = []
    generate_s: list[float] = []
    opt_bytes: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.faults0 = time.perf_counter(), allocator.minor_faults()

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            faults.append(allocator.minor_faults() - self.faults0)
            if optimizer is not None:
                opt_bytes.append(optimizer_state_bytes(optimizer))

    out_dir = tempfile.TemporaryDirectory(prefix="onelayer-bench-trl-")
    args = GRPOConfig(
        output_dir=out_dir.name, per_device_train_batch_size=spec.prompts * spec.num_generations,
        num_generations=spec.num_generations, max_completion_length=spec.max_new_tokens,
        learning_rate=spec.learning_rate, lr_scheduler_type="constant", beta=0.0, num_iterations=1,
        loss_type="grpo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
        use_cpu=not device.startswith("cuda"), bf16=False, fp16=False, gradient_checkpointing=False,
        max_steps=n_steps, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=spec.seed, dataloader_num_workers=0, log_completions=False, shuffle_dataset=False,
    )
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=trl_digit_reward, args=args,
                          train_dataset=data, callbacks=[Timer()])
    # TRL's generation + scoring time and completion lengths, through a private method: when a TRL version
    # lacks it, those two are just not reported
    orig = getattr(trainer, "_generate_and_score_completions", None)

    def record_lengths(*a, **kw):
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        generate_s.append(time.perf_counter() - t0)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    if orig is not None:
        trainer._generate_and_score_completions = record_lengths
    with out_dir:
        trainer.train()
    return {
        "step_s": times[spec.warmup:],
        "completion_len": lengths[spec.warmup:],
        "page_faults": faults[spec.warmup:], "cpu_memory": allocator.note(),
        "phases_s": {"generate_and_score": generate_s[spec.warmup:]} if generate_s[spec.warmup:] else {},
        "optimizer_bytes": opt_bytes[-1] if opt_bytes else 0, "trainable_params": sel.trainable_params,
        "peak_memory_bytes": _peak_memory_bytes(device),
    }


def run_worker(tool: str, spec: BenchSpec, model_dir: str, device: str, nproc: int = 1) -> dict:
    """One (tool, model, layers) run in a fresh interpreter (`nproc` > 1: that many, onelayer only); returns its
    measurements."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "onelayer.bench", tool, json.dumps(asdict(spec)), model_dir, device,
           result_path]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            raise BenchError(f"the {tool} run ({spec.model}, layers {spec.layers}) failed: "
                             f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)


def worker_main(argv: list[str]) -> int:
    """The subprocess's side of `run_worker`: argv is tool, spec JSON, model directory, device, result path."""
    tool, spec_json, model_dir, device, result_path = argv
    spec = BenchSpec(**json.loads(spec_json))
    fn = {"onelayer": _onelayer_worker, "trl": _trl_worker}[tool]
    try:
        result = fn(spec, model_dir, device)
    except BenchError as e:
        print(str(e), file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        Path(result_path).write_text(json.dumps(result))
    return 0
