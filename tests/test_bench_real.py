"""`onelayer bench` with the built-in real model: its settings, the prompts both tools get, and the CLI's
model check (no benchmark is run: that takes minutes for a 135M model)."""

from __future__ import annotations

from onelayer.bench import BenchSpec, bench_spec, bench_task, cpu_model, format_report


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
