"""`onelayer bench`: onelayer's RL step against TRL's `GRPOTrainer` on identical settings, and a FLOP floor.

For each model (default: the built-in tiny Qwen3, hidden 128 x 8 blocks, and `tiny-qwen3-large`, hidden
256 x 12; also the built-in real model `smollm2-135m`, hidden 576 x 30) and each trainable set (all
parameters; the single middle block), both tools train the *same* weights for `warmup + steps` RL steps:
a tiny model's random initialisation (saved once to a temporary directory), a real model's cached
pretrained directory (never warm-started). Per-model settings live in `MODEL_SETTINGS` (the rest are
`BenchSpec`'s defaults): the tiny models get 16 prompts x G=4 completions of at most 24 new tokens on
their terse arith prompts, the real one 8 prompts x G=8 of at most 8 new tokens on few-shot arith
prompts (level 8, sized for small pretrained models). Both tools draw their prompts from the same train
split, rendered by the benchmark's task (onelayer then trains with `prompt_format raw`, so neither stops
at a newline or cuts the completion); temperature 1, top-p 1, the same learning rate, beta 0, one update pass over the
whole batch, GRPO loss and group-scaled advantages. The reward (share of digits in the completion) is
the same function in both, so advantages are not all zero.

Every (tool, model, layers) run is its own subprocess, so one run's allocator state, threads or peak
memory cannot leak into the next. Runs alternate between the tools, and `rounds` repeats the whole set
in reversed order each time (step times pooled), so a drift in the machine's speed hits both tools alike. Times are medians over the steps
after warm-up: onelayer's come from its own `metrics.jsonl` (per phase: rollout, reward, logprob,
update), TRL's from a callback around each optimizer step (generation, reward, loss, backward, optimizer),
which leaves TRL's between-step logging out of its time. Peak memory is the worker's peak resident set on
CPU (`ru_maxrss`: process-wide, so it includes the interpreter and libraries, the same for every run) or
`torch.cuda.max_memory_allocated` on GPU; optimizer-state bytes are summed over the optimizer's state
tensors. The report names the CPU (`/proc/cpuinfo`), since the rates depend on it.

The floor is the step's matrix-multiply FLOPs (rollout with a KV cache, forward and backward of the
update; see `step_flops`) divided by the rate this machine measures for a 64 x H x I matmul, the shape of
one decode step's MLP — what a step would take with no overhead at all at that rate. Two rates are
measured: torch's default `a @ b` and the linear onelayer's lean path uses (oneDNN on CPU where
available); the floor takes the faster, so onelayer is not measured against a floor its own kernels beat.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from onelayer.policy import kernels
from onelayer.policy.kernels import cpu_model

DEFAULT_MODELS = ("tiny-qwen3", "tiny-qwen3-large")
LAYER_SETS = ("all", "middle:1")


class BenchError(RuntimeError):
    """The benchmark cannot run (e.g. TRL missing); the message says how to fix it."""


@dataclass
class BenchSpec:
    model: str = "tiny-qwen3"
    layers: str = "all"
    prompts: int = 16
    num_generations: int = 4
    max_new_tokens: int = 24
    learning_rate: float = 1e-4
    difficulty: int = 2  # arith level of the prompts (onelayer.tasks.arith)
    prompt_format: str = "raw"  # raw or fewshot (onelayer.tasks.prompts), rendered into the prompt text
    steps: int = 6
    warmup: int = 2
    threads: int | None = None
    seed: int = 0


# where a model's settings differ from BenchSpec's defaults (which suit the character-level tiny models)
MODEL_SETTINGS: dict[str, dict] = {
    "smollm2-135m": dict(prompts=8, num_generations=8, max_new_tokens=8, learning_rate=1e-5, difficulty=8,
                         prompt_format="fewshot"),
}
PER_MODEL_KEYS = ("prompts", "num_generations", "max_new_tokens", "learning_rate", "difficulty", "prompt_format")


def bench_spec(model: str, **run) -> BenchSpec:
    """The settings both tools use for `model`; `run` sets the run-wide ones (steps, warmup, threads)."""
    return BenchSpec(model=model, **MODEL_SETTINGS.get(model, {}), **run)


# ---------------------------------------------------------------------------------------------- the reward


def digit_share(completion: str) -> float:
    """Share of characters in the completion that are digits (0 for an empty one): a cheap reward with spread."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def trl_digit_reward(prompts, completions, **_columns) -> list[float]:
    """`digit_share` with TRL's reward-function signature."""
    return [digit_share(c) for c in completions]


def _register_bench_task() -> None:
    """Arith prompts already rendered in a prompt format (raw or fewshot), scored by `digit_share`; a private
    task name only the benchmark uses. Rendering them here gives both tools the same prompt text with no
    stop string."""
    from onelayer import tasks
    from onelayer.tasks.arith import ArithTask
    from onelayer.tasks.prompts import PromptFormat, formatted

    class DigitShareTask(ArithTask):
        name = "_bench_digits"

        def __init__(self, prompt_format: str = "raw", **opts):
            super().__init__(**opts)
            self._rendered = formatted(ArithTask(**opts), None, PromptFormat(prompt_format))  # no tokenizer: no chat
            self.options = {**self.options, "prompt_format": prompt_format}

        def items(self, split):
            return self._rendered.items(split)

        def score(self, item, completion):
            return digit_share(completion)

        def score_batch(self, items, completions):
            return [digit_share(c) for c in completions]

    if "_bench_digits" not in tasks.registered():
        tasks.register("_bench_digits", DigitShareTask)


def bench_task(spec: BenchSpec):
    """The benchmark's task for `spec`: the same options in both tools and in the FLOP count."""
    from onelayer import tasks

    _register_bench_task()
    return tasks.make("_bench_digits", **_task_options(spec))


def _task_options(spec: BenchSpec) -> dict:
    return {"difficulty": spec.difficulty, "prompt_format": spec.prompt_format, "seed": spec.seed}


# ------------------------------------------------------------------------------------------------ FLOPs


def _shape(config) -> dict:
    from onelayer.models.plan import block_shape

    b = block_shape(config)
    return dict(H=b["hidden"], I=b["intermediate"], V=b["vocab"], L=config.num_hidden_layers, q=b["q"], kv=b["kv"],
                heads=b["q"] // b["head_dim"], head_dim=b["head_dim"])


def step_flops(config, *, prompt_lens: list[int], num_generations: int, new_tokens: int,
               lowest_trainable: int, trainable_blocks: int, train_head: bool, parts: bool = False) -> dict:
    """Matrix-multiply FLOPs (2 per multiply-add) of one RL step, by phase.

    rollout: each distinct prompt prefilled once (left-padded to the longest), then one token per row for
    `new_tokens - 1` decode steps against a KV cache, with the LM head on one position per row per step.
    update: one forward over the whole batch (prompt + completion) from block `lowest_trainable` up (the
    blocks below are frozen and their outputs known), the LM head on the completion positions, and the
    backward: input gradients through the head and every block on the gradient path (the lowest trainable
    one and all above it; attention backward counted as twice its forward), weight gradients for the
    trainable blocks and the head when it trains. Norms, activations, softmax and the optimizer are not
    matmuls and not counted. `parts=True` adds the linear / attention split of each phase.
    """
    s = _shape(config)
    H, I, V, L = s["H"], s["I"], s["V"], s["L"]
    linear = H * (s["q"] + 2 * s["kv"]) + s["q"] * H + 3 * H * I  # MACs per token per block
    attn = lambda ctx: 2 * s["heads"] * s["head_dim"] * ctx  # noqa: E731 - QK^T and AV, MACs per query token
    N, G, T = len(prompt_lens), num_generations, new_tokens
    P = max(prompt_lens)
    B, S = N * G, P + T
    head = H * V

    roll_lin = N * P * L * linear + N * head + B * (T - 1) * (L * linear + head)
    roll_att = N * L * sum(attn(i + 1) for i in range(P)) + B * L * sum(attn(P + t + 1) for t in range(1, T))
    run = L - lowest_trainable
    causal = sum(attn(i + 1) for i in range(S))  # attention MACs of one causal sequence through one block
    upd_lin = (B * S * run * linear + B * T * head  # forward
               + B * S * run * linear + B * T * head  # input gradients
               + B * S * trainable_blocks * linear + (B * T * head if train_head else 0))  # weight gradients
    upd_att = B * run * causal * 3  # forward + backward
    out = {"rollout": 2 * (roll_lin + roll_att), "update": 2 * (upd_lin + upd_att)}
    out["total"] = out["rollout"] + out["update"]
    if parts:
        out.update(rollout_linear=2 * roll_lin, rollout_attention=2 * roll_att, update_linear=2 * upd_lin,
                   update_attention=2 * upd_att)
    return out


def matmul_gflops(m: int, k: int, n: int, *, reps: int = 200, device: str = "cpu", kernel: str = "torch") -> float:
    """Median rate (GFLOP/s) of an [m, k] x [k, n] float32 matmul, timed in batches of `reps`.

    kernel "torch": `a @ b` (torch's default CPU GEMM, MKL in these builds); "onednn": oneDNN's linear, the
    other kernel onelayer's lean paths choose from (`onelayer.policy.kernels`; torch's where oneDNN is
    unavailable)."""
    a, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    wt = w.t().contiguous()
    use_onednn = kernel == "onednn" and kernels.onednn_available() and device == "cpu"
    fn = (lambda: kernels.onednn_linear(a, w, None)) if use_onednn else (lambda: a @ wt)
    with torch.inference_mode():
        for _ in range(10):
            fn()
        rates = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if device != "cpu":
                torch.cuda.synchronize()
            rates.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------- workers


def _peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _onelayer_worker(spec: BenchSpec, model_dir: str, device: str) -> dict:
    from onelayer.config import TrainConfig
    from onelayer.io import read_jsonl
    from onelayer.train.loop import run

    _register_bench_task()
    # prompt_format raw: the task's prompts are already rendered in spec.prompt_format (see bench_task)
    cfg = TrainConfig(
        model=model_dir, task="_bench_digits", task_opts={**_task_options(spec), "n_eval": spec.prompts},
        prompt_format="raw", layers=spec.layers, warm_start=False, prompts_per_step=spec.prompts,
        num_generations=spec.num_generations, max_completion_length=spec.max_new_tokens,
        learning_rate=spec.learning_rate, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0,
        max_steps=spec.warmup + spec.steps, save_every=10**9, save_model=False, progress=False,
        threads=spec.threads, seed=spec.seed, device=device,
    )
    with tempfile.TemporaryDirectory() as out:
        record = run(cfg, out, log=lambda *_: None)
        rows = read_jsonl(Path(out) / "metrics.jsonl")[spec.warmup:]
    phases = ("rollout_s", "reward_s", "logprob_s", "update_s")
    return {
        "step_s": [r["seconds"] for r in rows],
        "phases_s": {p[:-2]: [r[p] for r in rows] for p in phases},
        "completion_len": [r["completion_len"] for r in rows],
        "optimizer_bytes": rows[-1]["optimizer_bytes"],
        "trainable_params": record["trainable_params"],
        "peak_memory_bytes": _peak_memory_bytes(device),
        "cpu_kernels": record.get("cpu_kernels", {}),
    }


def _trl_worker(spec: BenchSpec, model_dir: str, device: str) -> dict:
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise BenchError(f"TRL is needed for the comparison ({e}); install it with pip install 'onelayer[bench]'") from None
    from onelayer.models.layers import select_layers
    from onelayer.train.loop import optimizer_state_bytes

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
    lengths: list[float] = []
    generate_s: list[float] = []
    opt_bytes: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
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
        "phases_s": {"generate_and_score": generate_s[spec.warmup:]} if generate_s[spec.warmup:] else {},
        "optimizer_bytes": opt_bytes[-1] if opt_bytes else 0, "trainable_params": sel.trainable_params,
        "peak_memory_bytes": _peak_memory_bytes(device),
    }


def _run_worker(tool: str, spec: BenchSpec, model_dir: str, device: str) -> dict:
    """One (tool, model, layers) run in a fresh interpreter; returns its measurements."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, "-m", "onelayer.bench", tool, json.dumps(asdict(spec)), model_dir, device, result_path]
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


# ---------------------------------------------------------------------------------------------- driver


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _pool(runs: dict, key: str, new: dict) -> None:
    """Add one round's measurements of a run to the earlier rounds' (per-step lists concatenated, peaks maxed)."""
    if key not in runs:
        runs[key] = new
        return
    old = runs[key]
    old["step_s"] += new["step_s"]
    old["completion_len"] += new["completion_len"]
    for phase, values in new.get("phases_s", {}).items():
        old["phases_s"].setdefault(phase, []).extend(values)
    old["peak_memory_bytes"] = max(old["peak_memory_bytes"], new["peak_memory_bytes"])


def _model_dir(model: str, tmp: str, log) -> str:
    """The directory both tools load `model` from: a real model's cached one, or a tiny model's random
    initialisation saved into `tmp`."""
    from onelayer.models import BUILTIN_MODELS, build_tiny, resolve_real

    if model not in BUILTIN_MODELS:
        return resolve_real(model, log=log)
    built, tok = build_tiny(model, seed=0)
    built.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


def bench_model(model: str, *, steps: int, warmup: int, threads: int | None, device: str, with_trl: bool,
                rounds: int = 2, log=print) -> dict:
    """Both layer sets of one model, both tools; returns the medians, ratios and floors."""
    with tempfile.TemporaryDirectory(prefix="onelayer-bench-") as tmp:
        return _bench_model(model, _model_dir(model, tmp, log), steps=steps, warmup=warmup, threads=threads,
                            device=device, with_trl=with_trl, rounds=rounds, log=log)


def _bench_model(model: str, model_dir: str, *, steps: int, warmup: int, threads: int | None, device: str,
                 with_trl: bool, rounds: int, log) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from onelayer.models.layers import middle_layers

    base = bench_spec(model, steps=steps, warmup=warmup, threads=threads)
    config, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    mid = middle_layers(1, config.num_hidden_layers)[0]
    prompts = [it["prompt"] for it in bench_task(base).items("train")[:base.prompts]]
    prompt_lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    s = _shape(config)
    if threads:
        torch.set_num_threads(threads)
    rows = base.prompts * base.num_generations  # the decode matmuls' row count
    rates = {kernel: matmul_gflops(rows, s["H"], s["I"], device=device, kernel=kernel) for kernel in ("torch", "onednn")}
    rate = max(rates.values())  # the floor uses the fastest matmul this machine offers
    result: dict = {"model": model, "settings": {k: getattr(base, k) for k in PER_MODEL_KEYS},
                    "shape": {k: s[k] for k in ("H", "I", "L", "V")}, "middle_block": mid,
                    "matmul_shape": [rows, s["H"], s["I"]], "matmul_gflops": round(rates["torch"], 1),
                    "onednn_matmul_gflops": round(rates["onednn"], 1), "floor_gflops": round(rate, 1),
                    "kernel_choice": kernels.choose(rows, s["H"], s["I"]) if device == "cpu" else "default",
                    "runs": {}}
    tools = ("onelayer", "trl") if with_trl else ("onelayer",)
    order = [(layers, tool) for layers in LAYER_SETS for tool in tools]
    # rounds alternate the order of the runs, so slow drift of the machine's speed hits every run alike;
    # step times of all rounds are pooled per run
    for r in range(rounds):
        for layers, tool in (order if r % 2 == 0 else order[::-1]):
            spec = replace(base, layers=layers)
            log(f"  {model} layers={layers}: {tool} (round {r + 1}/{rounds}: {warmup} warm-up + {steps} timed steps)")
            _pool(result["runs"], f"{tool}/{layers}", _run_worker(tool, spec, model_dir, device))

    runs = result["runs"]
    for r in runs.values():  # per-step completion lengths -> their mean over all rounds
        r["completion_len"] = statistics.mean(r["completion_len"]) if r["completion_len"] else float("nan")
    med = {k: _median(r["step_s"]) for k, r in runs.items()}
    phases = {k: {p: _median(v) for p, v in r["phases_s"].items()} for k, r in runs.items()}
    flops = {
        layers: step_flops(config, prompt_lens=prompt_lens, num_generations=base.num_generations,
                           new_tokens=base.max_new_tokens,
                           lowest_trainable=0 if layers == "all" else mid,
                           trainable_blocks=s["L"] if layers == "all" else 1, train_head=layers == "all")
        for layers in LAYER_SETS
    }
    floor = {layers: f["total"] / (rate * 1e9) for layers, f in flops.items()}
    summary = {
        "onelayer_full_s": med["onelayer/all"], "onelayer_layer_s": med["onelayer/middle:1"],
        "onelayer_full_phases_s": phases["onelayer/all"], "onelayer_layer_phases_s": phases["onelayer/middle:1"],
        "floor_full_s": floor["all"], "floor_layer_s": floor["middle:1"],
        "flops_full": flops["all"], "flops_layer": flops["middle:1"],
        "full_vs_floor": med["onelayer/all"] / floor["all"],
        "layer_update_vs_full_update": phases["onelayer/middle:1"]["update"] / phases["onelayer/all"]["update"],
        "layer_peak_memory_vs_full": runs["onelayer/middle:1"]["peak_memory_bytes"] / runs["onelayer/all"]["peak_memory_bytes"],
        "optimizer_bytes_full": runs["onelayer/all"]["optimizer_bytes"],
        "optimizer_bytes_layer": runs["onelayer/middle:1"]["optimizer_bytes"],
    }
    if with_trl:
        summary.update({
            "trl_full_s": med["trl/all"], "trl_layer_s": med["trl/middle:1"],
            "full_vs_trl": med["onelayer/all"] / med["trl/all"],
            "layer_vs_trl": med["onelayer/middle:1"] / med["trl/middle:1"],
            "floor_vs_trl": floor["all"] / med["trl/all"],
            "trl_optimizer_bytes_full": runs["trl/all"]["optimizer_bytes"],
            "trl_optimizer_bytes_layer": runs["trl/middle:1"]["optimizer_bytes"],
        })
    result["summary"] = summary
    return result


def run_bench(models=DEFAULT_MODELS, *, steps: int = 6, warmup: int = 2, threads: int | None = None,
              device: str = "cpu", with_trl: bool = True, rounds: int = 2, log=print) -> dict:
    """The whole benchmark. Top-level keys of the result: the first model's ratios (`full_vs_trl`,
    `layer_vs_trl`, `layer_update_vs_full_update`, `full_vs_floor`, …), `cpu`, `settings` (run-wide) and
    `models` (per model, each with its own `settings`: prompts, G, new tokens, learning rate, prompts' kind)."""
    if steps < 5:
        raise BenchError(f"--steps {steps}: medians need at least 5 timed steps")
    if with_trl and not trl_available():
        raise BenchError("TRL is not installed; pip install 'onelayer[bench]' (or pass --no-trl to time onelayer alone)")
    settings = {"beta": 0.0, "num_iterations": 1, "steps": steps, "warmup": warmup, "rounds": rounds,
                "threads": threads or torch.get_num_threads(), "device": device, "torch": torch.__version__}
    if with_trl:
        import trl

        settings["trl"] = trl.__version__
    per_model = {}
    for m in models:
        log(f"benchmarking {m}")
        per_model[m] = bench_model(m, steps=steps, warmup=warmup, threads=threads, device=device, with_trl=with_trl,
                                   rounds=rounds, log=log)
    return {**per_model[models[0]]["summary"], "cpu": cpu_model(), "settings": settings, "models": per_model}


def format_report(result: dict) -> str:
    """The CPU, then a short text table per model."""
    lines = [f"cpu: {result['cpu']}"]
    for name, m in result["models"].items():
        s, c = m["summary"], m["settings"]
        lines.append(f"{name} (hidden {m['shape']['H']} x {m['shape']['L']} blocks; middle block {m['middle_block']}; "
                     f"{c['prompts']} prompts x G={c['num_generations']}, <= {c['max_new_tokens']} new tokens, "
                     f"{c['prompt_format']} arith level {c['difficulty']}; "
                     f"matmul {m['matmul_shape']}: torch {m['matmul_gflops']}, onednn {m['onednn_matmul_gflops']} "
                     f"GFLOP/s, chosen {m['kernel_choice']})")
        for layers in ("all", "middle:1"):
            made = [c["choice"] for c in m["runs"][f"onelayer/{layers}"].get("cpu_kernels", {}).values()]
            if made:
                lines.append(f"  onelayer {layers:9s} kernels: {made.count('onednn')} shapes onednn, "
                             f"{made.count('default')} default")
        for layers, key in (("all", "full"), ("middle:1", "layer")):
            ph = s[f"onelayer_{key}_phases_s"]
            run = m["runs"][f"onelayer/{layers}"]
            lines.append(
                f"  onelayer {layers:9s} step {s[f'onelayer_{key}_s'] * 1e3:7.1f} ms  (rollout {ph['rollout'] * 1e3:.1f}, "
                f"reward {ph['reward'] * 1e3:.1f}, logprob {ph['logprob'] * 1e3:.1f}, update {ph['update'] * 1e3:.1f})  "
                f"floor {s[f'floor_{key}_s'] * 1e3:.1f} ms  peak {run['peak_memory_bytes'] / 2**20:.0f} MiB  "
                f"optimizer {run['optimizer_bytes'] / 2**20:.2f} MiB"
            )
            if f"trl/{layers}" in m["runs"]:
                trl = m["runs"][f"trl/{layers}"]
                gen = trl["phases_s"].get("generate_and_score")
                gen = f"(generate + score {_median(gen) * 1e3:.1f})  " if gen else ""
                lines.append(f"  trl      {layers:9s} step {s[f'trl_{key}_s'] * 1e3:7.1f} ms  {gen}"
                             f"peak {trl['peak_memory_bytes'] / 2**20:.0f} MiB  optimizer {trl['optimizer_bytes'] / 2**20:.2f} MiB")
        ratios = ["full_vs_trl", "layer_vs_trl", "layer_update_vs_full_update", "full_vs_floor", "floor_vs_trl",
                  "layer_peak_memory_vs_full"]
        lines.append("  " + "  ".join(f"{k} {s[k]:.2f}" for k in ratios if k in s))
    return "\n".join(lines)


def _worker_main(argv: list[str]) -> int:
    tool, spec_json, model_dir, device, result_path = argv
    spec = BenchSpec(**json.loads(spec_json))
    fn = {"onelayer": _onelayer_worker, "trl": _trl_worker}[tool]
    try:
        result = fn(spec, model_dir, device)
    except BenchError as e:
        print(str(e), file=sys.stderr)
        return 2
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
