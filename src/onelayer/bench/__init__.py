"""`onelayer bench`: onelayer's RL step against TRL's `GRPOTrainer` on identical settings, and a FLOP floor.

For each model (default: the built-in tiny Qwen3, hidden 128 x 8 blocks, and `tiny-qwen3-large`, hidden
256 x 12; also the built-in real model `smollm2-135m`, hidden 576 x 30) and each trainable set (all
parameters; the single middle block), both tools train the *same* weights for `warmup + steps` RL steps:
a tiny model's random initialisation (saved once to a temporary directory), a real model's cached
pretrained directory (never warm-started), with the settings, prompts and reward of `spec`.

Every (tool, model, layers) run is its own subprocess (`workers`). Runs alternate between the tools, and
`rounds` repeats the whole set in reversed order each time (step times pooled), so a drift in the
machine's speed hits both tools alike. Times are medians over the steps after warm-up. Each model's
result also holds its FLOP floor (`floor`). The report names the CPU (`/proc/cpuinfo`), since the rates
depend on it.

This module is the driver, the result's JSON and the text report; `spec` holds what a run is, `workers`
the per-run subprocesses, `floor` the FLOP count and matmul rates.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace

import torch

from onelayer.bench.floor import matmul_gflops, model_shape, step_flops
from onelayer.bench.spec import (
    DEFAULT_MODELS,
    LAYER_SETS,
    MODEL_SETTINGS,
    PER_MODEL_KEYS,
    BenchError,
    BenchSpec,
    bench_spec,
    bench_task,
    digit_share,
    trl_digit_reward,
)
from onelayer.bench.workers import run_worker
from onelayer.policy import kernels
from onelayer.policy.kernels import cpu_model

__all__ = [
    "BenchError",
    "BenchSpec",
    "DEFAULT_MODELS",
    "LAYER_SETS",
    "MODEL_SETTINGS",
    "bench_model",
    "bench_spec",
    "bench_task",
    "cpu_model",
    "digit_share",
    "format_report",
    "matmul_gflops",
    "run_bench",
    "step_flops",
    "trl_available",
    "trl_digit_reward",
]


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
    old["page_faults"] = old.get("page_faults", []) + new.get("page_faults", [])
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
                rounds: int = 2, nproc: int = 1, trl_allocator: str = "system", log=print) -> dict:
    """Both layer sets of one model, both tools (and onelayer on `nproc` processes); returns the medians, ratios
    and floors."""
    with tempfile.TemporaryDirectory(prefix="onelayer-bench-") as tmp:
        return _bench_model(model, _model_dir(model, tmp, log), steps=steps, warmup=warmup, threads=threads,
                            device=device, with_trl=with_trl, rounds=rounds, nproc=nproc, trl_allocator=trl_allocator,
                            log=log)


def _bench_model(model: str, model_dir: str, *, steps: int, warmup: int, threads: int | None, device: str,
                 with_trl: bool, rounds: int, nproc: int, trl_allocator: str, log) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from onelayer.models.layer_spec import middle_layers

    base = bench_spec(model, steps=steps, warmup=warmup, threads=threads, trl_allocator=trl_allocator)
    config, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    mid = middle_layers(1, config.num_hidden_layers)[0]
    prompts = [it["prompt"] for it in bench_task(base).items("train")[:base.prompts]]
    prompt_lens = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    s = model_shape(config)
    if threads:
        torch.set_num_threads(threads)
    rows = base.prompts * base.num_generations  # the decode matmuls' row count
    rates = {kernel: matmul_gflops(rows, s["H"], s["I"], device=device, kernel=kernel)
             for kernel in ("torch", "onednn", "split", "packed")}
    rate = max(rates.values())  # the floor uses the fastest matmul this machine offers
    result: dict = {"model": model, "settings": {k: getattr(base, k) for k in PER_MODEL_KEYS},
                    "shape": {k: s[k] for k in ("H", "I", "L", "V")}, "middle_block": mid,
                    "matmul_shape": [rows, s["H"], s["I"]], "matmul_gflops": round(rates["torch"], 1),
                    "onednn_matmul_gflops": round(rates["onednn"], 1), "split_matmul_gflops": round(rates["split"], 1),
                    "packed_matmul_gflops": round(rates["packed"], 1),
                    "floor_gflops": round(rate, 1),
                    "kernel_choice": kernels.choose(rows, s["H"], s["I"]) if device == "cpu" else "default",
                    "runs": {}}
    tools = ("onelayer", "trl") if with_trl else ("onelayer",)
    if nproc > 1:
        tools += (f"onelayer*{nproc}",)  # the same global batch over nproc processes
    order = [(layers, tool) for layers in LAYER_SETS for tool in tools]
    # rounds alternate the order of the runs, so slow drift of the machine's speed hits every run alike;
    # step times of all rounds are pooled per run
    for r in range(rounds):
        for layers, tool in (order if r % 2 == 0 else order[::-1]):
            spec = replace(base, layers=layers)
            log(f"  {model} layers={layers}: {tool} (round {r + 1}/{rounds}: {warmup} warm-up + {steps} timed steps)")
            name, n = tool.partition("*")[::2]
            _pool(result["runs"], f"{tool}/{layers}", run_worker(name, spec, model_dir, device, nproc=int(n or 1)))

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
    if nproc > 1:
        summary.update({"nproc": nproc, "nproc_full_s": med[f"onelayer*{nproc}/all"],
                        "nproc_layer_s": med[f"onelayer*{nproc}/middle:1"],
                        "nproc_full_vs_one": med[f"onelayer*{nproc}/all"] / med["onelayer/all"],
                        "nproc_layer_vs_one": med[f"onelayer*{nproc}/middle:1"] / med["onelayer/middle:1"],
                        "nproc_full_phases_s": phases[f"onelayer*{nproc}/all"],
                        "nproc_layer_phases_s": phases[f"onelayer*{nproc}/middle:1"]})
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
              device: str = "cpu", with_trl: bool = True, rounds: int = 2, nproc: int = 1, trl_allocator: str = "system",
              log=print) -> dict:
    """The whole benchmark. Top-level keys of the result: the first model's ratios (`full_vs_trl`,
    `layer_vs_trl`, `layer_update_vs_full_update`, `full_vs_floor`, …), `cpu`, `settings` (run-wide) and
    `models` (per model, each with its own `settings`: prompts, G, new tokens, learning rate, prompts' kind)."""
    if steps < 5:
        raise BenchError(f"--steps {steps}: medians need at least 5 timed steps")
    if with_trl and not trl_available():
        raise BenchError("TRL is not installed; pip install 'onelayer[bench]' (or pass --no-trl to time onelayer alone)")
    settings = {"beta": 0.0, "num_iterations": 1, "steps": steps, "warmup": warmup, "rounds": rounds,
                "threads": threads or torch.get_num_threads(), "device": device, "torch": torch.__version__,
                "trl_allocator": trl_allocator}
    if with_trl:
        import trl

        settings["trl"] = trl.__version__
    per_model = {}
    for m in models:
        log(f"benchmarking {m}")
        per_model[m] = bench_model(m, steps=steps, warmup=warmup, threads=threads, device=device, with_trl=with_trl,
                                   rounds=rounds, nproc=nproc, trl_allocator=trl_allocator, log=log)
    return {**per_model[models[0]]["summary"], "cpu": cpu_model(), "settings": settings, "models": per_model}


def _decode_note(decided: dict) -> str:
    """Which decode step served (`policy.fused`) with its measured times, in a few words."""
    def note(v: dict) -> str:
        if "python" not in v:
            return f"{v['choice']} ({v.get('reason', '')})"
        return f"{v['choice']} (" + ", ".join(f"{x} {v[x] * 1e3:.2f} ms" for x in ("python", "fused", "packed") if x in v) + ")"

    picks = [note(v) for k, v in decided.items() if k.startswith("decode:")]
    return picks[-1] if picks else f"python ({decided.get('build', 'no record')})"


def _train_note(decided: dict) -> str:
    """Which element-wise ops the training forward ran (`policy.fused_ops`) with their measured times."""
    picks = [f"{v['choice']} (torch {v['torch'] * 1e3:.1f} ms, compiled {v['compiled'] * 1e3:.1f} ms)" if "torch" in v
             else f"{v['choice']} ({v.get('reason', '')})" for k, v in decided.items() if k.startswith("train:")]
    return picks[-1] if picks else f"torch ({decided.get('build', 'no record')})"


def _faults(run: dict) -> str:
    """The run's median minor page faults per timed step (fresh pages the allocator asked the OS for)."""
    faults = run.get("page_faults") or []
    return f"page faults/step {statistics.median(faults):.0f}" if faults else ""


def format_report(result: dict) -> str:
    """The CPU, then a short text table per model."""
    lines = [f"cpu: {result['cpu']}"]
    for name, m in result["models"].items():
        s, c = m["summary"], m["settings"]
        lines.append(f"{name} (hidden {m['shape']['H']} x {m['shape']['L']} blocks; middle block {m['middle_block']}; "
                     f"{c['prompts']} prompts x G={c['num_generations']}, <= {c['max_new_tokens']} new tokens, "
                     f"{c['prompt_format']} arith level {c['difficulty']}; "
                     f"matmul {m['matmul_shape']}: torch {m['matmul_gflops']}, onednn {m['onednn_matmul_gflops']}, "
                     f"split {m.get('split_matmul_gflops', '-')}, packed {m.get('packed_matmul_gflops', '-')} GFLOP/s, "
                     f"chosen {m['kernel_choice']})")
        for layers in ("all", "middle:1"):
            run = m["runs"][f"onelayer/{layers}"]
            made = [c["choice"] for c in run.get("cpu_kernels", {}).values()]
            if made:
                per_kernel = ", ".join(f"{made.count(k)} {k}" for k in kernels.KERNELS if made.count(k))
                lines.append(f"  onelayer {layers:9s} kernels: shapes {per_kernel}; "
                             f"decode step: {_decode_note(run.get('decode_step', {}))}; "
                             f"training ops: {_train_note(run.get('train_ops', {}))}")
        for layers, key in (("all", "full"), ("middle:1", "layer")):
            ph = s[f"onelayer_{key}_phases_s"]
            run = m["runs"][f"onelayer/{layers}"]
            lines.append(
                f"  onelayer {layers:9s} step {s[f'onelayer_{key}_s'] * 1e3:7.1f} ms  (rollout {ph['rollout'] * 1e3:.1f}, "
                f"reward {ph['reward'] * 1e3:.1f}, logprob {ph['logprob'] * 1e3:.1f}, update {ph['update'] * 1e3:.1f})  "
                f"floor {s[f'floor_{key}_s'] * 1e3:.1f} ms  peak {run['peak_memory_bytes'] / 2**20:.0f} MiB  "
                f"optimizer {run['optimizer_bytes'] / 2**20:.2f} MiB  {_faults(run)}"
            )
            if f"trl/{layers}" in m["runs"]:
                trl = m["runs"][f"trl/{layers}"]
                gen = trl["phases_s"].get("generate_and_score")
                gen = f"(generate + score {_median(gen) * 1e3:.1f})  " if gen else ""
                lines.append(f"  trl      {layers:9s} step {s[f'trl_{key}_s'] * 1e3:7.1f} ms  {gen}"
                             f"peak {trl['peak_memory_bytes'] / 2**20:.0f} MiB  "
                             f"optimizer {trl['optimizer_bytes'] / 2**20:.2f} MiB  {_faults(trl)}")
        if "nproc" in s:
            for layers, key in (("all", "full"), ("middle:1", "layer")):
                ph = s[f"nproc_{key}_phases_s"]
                lines.append(
                    f"  onelayer {layers:9s} on {s['nproc']} processes: step {s[f'nproc_{key}_s'] * 1e3:7.1f} ms  "
                    f"(rollout {ph['rollout'] * 1e3:.1f}, logprob {ph['logprob'] * 1e3:.1f}, update {ph['update'] * 1e3:.1f}); "
                    f"{s[f'nproc_{key}_vs_one']:.2f} x one process's")
        ratios = ["full_vs_trl", "layer_vs_trl", "layer_update_vs_full_update", "full_vs_floor", "floor_vs_trl",
                  "layer_peak_memory_vs_full"]
        lines.append("  " + "  ".join(f"{k} {s[k]:.2f}" for k in ratios if k in s))
    return "\n".join(lines)
