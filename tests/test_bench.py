"""`onelayer bench` (onelayer.bench): the floor's FLOP count, the report of a short benchmark of the tiny
model, argument errors, and the settings, prompts and model check of the built-in real model (no benchmark
of the real model is run: that takes minutes for a 135M model)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import V, build
from onelayer.bench import BenchSpec, bench_spec, bench_task, cpu_model, format_report
from onelayer.models.layers import select_layers
from onelayer.policy import sequence_logprobs


def test_step_flops_counts_what_torch_counts():
    """The floor's matmul FLOPs for the update phase, against torch's FLOP counter on the model's own forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from onelayer.bench import step_flops

    model = build("llama")
    ids = torch.randint(2, V, (6, 10))  # 2 prompts x G=3, prompt 4 + completion 6
    select_layers(model, "all", train_non_block=True)
    counter = FlopCounterMode(display=False)
    with counter:
        lp = sequence_logprobs(model, ids, torch.ones_like(ids), 4, lean=False)
        lp.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for k, v in counts.items() if str(k).split(".")[1] in ("mm", "addmm"))
    ours = step_flops(model.config, prompt_lens=[4, 4], num_generations=3, new_tokens=6, lowest_trainable=0,
                      trainable_blocks=4, train_head=True, parts=True)["update_linear"]
    # torch's head matmul also covers the prompt's last position predicting the first completion token
    assert ours == pytest.approx(linear, rel=0.02)



@pytest.mark.slow
def test_bench_reports_ratios_and_optimizer_bytes(tmp_path):
    """`onelayer bench` end to end on the small model: ratios, phases, floor and memory are all reported
    (with TRL when it is installed; the bench extra installs it)."""
    from onelayer.bench import trl_available
    from onelayer.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--models", "tiny-qwen3", "--steps", "5", "--warmup", "1", "--threads", "1", "--rounds", "1",
            "--json", str(out)]
    assert main(args + ([] if trl_available() else ["--no-trl"])) == 0
    result = json.loads(out.read_text())
    keys = ["layer_update_vs_full_update", "full_vs_floor"] + (["full_vs_trl", "layer_vs_trl"] if trl_available() else [])
    assert all(result[k] > 0 for k in keys)
    runs = result["models"]["tiny-qwen3"]["runs"]
    assert set(runs["onelayer/all"]["phases_s"]) == {"rollout", "reward", "logprob", "update"}
    assert len(runs["onelayer/all"]["step_s"]) == 5
    assert 0 < result["optimizer_bytes_layer"] < result["optimizer_bytes_full"]
    assert result["flops_layer"]["update"] < result["flops_full"]["update"]
    assert result["flops_layer"]["rollout"] == result["flops_full"]["rollout"]



def test_bench_rejects_bad_arguments(capsys):
    from onelayer.cli import main

    assert main(["bench", "--models", "gpt-17", "--no-trl"]) == 2
    assert "not a built-in tiny model" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny-qwen3", "--steps", "3", "--no-trl"]) == 2
    assert "at least 5" in capsys.readouterr().err



def test_bench_without_trl_says_how_to_install_it(monkeypatch, capsys):
    import onelayer.bench as bench
    from onelayer.cli import main

    monkeypatch.setattr(bench, "trl_available", lambda: False)
    assert main(["bench", "--models", "tiny-qwen3"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'onelayer[bench]'" in err and "--no-trl" in err and "Traceback" not in err



def test_real_model_settings_and_tiny_defaults():
    real = bench_spec("smollm2-135m", steps=5, warmup=1, threads=1)
    assert (real.prompts, real.num_generations, real.prompt_format, real.difficulty) == (8, 8, "fewshot", 8)
    assert real.max_new_tokens <= 8 and (real.steps, real.warmup, real.threads) == (5, 1, 1)
    assert bench_spec("tiny-qwen3") == BenchSpec(model="tiny-qwen3")  # the tiny models keep the defaults


def test_bench_prompts_are_rendered_and_have_no_stop_string():
    """Both tools read the prompts from the same task: few-shot text for the real model, the terse prompt
    for the tiny ones, and nothing that would stop onelayer's sampler earlier than TRL's."""
    real, tiny = bench_task(bench_spec("smollm2-135m")), bench_task(bench_spec("tiny-qwen3"))
    first = real.items("train")[0]
    assert first["prompt"].count("\n") == 4 and first["prompt"].endswith(first["id"] + "=")
    assert real.items("train")[:8] == bench_task(bench_spec("smollm2-135m")).items("train")[:8]
    assert tiny.items("train")[0]["prompt"] == tiny.items("train")[0]["id"] + "="
    assert getattr(real, "stop_strings", ()) == () and getattr(tiny, "stop_strings", ()) == ()
    assert real.score_batch([first], ["12\n3+4"]) == [4 / 6]  # digit share of the whole completion


def test_cli_accepts_real_models_and_lists_them(monkeypatch, capsys):
    import onelayer.bench as bench
    from onelayer.cli import main

    seen = []

    def fake_run_bench(models, **kw):
        seen.append(models)
        return {"cpu": cpu_model(), "settings": {}, "models": {}}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert main(["bench", "--models", "smollm2-135m", "--no-trl"]) == 0
    assert seen == [("smollm2-135m",)] and capsys.readouterr().out.startswith("cpu: ")
    assert main(["bench", "--models", "smollm2-1b", "--no-trl"]) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "tiny-qwen3" in err and len(err.strip().splitlines()) == 1


def test_report_starts_with_the_cpu():
    assert cpu_model()
    assert format_report({"cpu": "Some CPU", "models": {}}) == "cpu: Some CPU"
