"""One config mechanism for every command: each field of a command's dataclasses is a flag in its --help
with a real default, bad keys and types fail naming the key, the flags stay as they were, one dtype
vocabulary everywhere, and flag values reach the configs as before."""

import dataclasses
import re

import pytest

from onelayer.cli import _values, build_parser, flag_name, main, preset_path
from onelayer.config import (
    DTYPE_ALIASES,
    DTYPES,
    BenchConfig,
    ConfigError,
    EvalConfig,
    PlanConfig,
    SweepConfig,
    TrainConfig,
    load_yaml,
    make_config,
)
from onelayer.probe import ProbeSpec
from onelayer.sweep import SweepSpec, make_spec
from onelayer.sweep.ensemble import EnsembleSpec
from onelayer.sweep.recipes import RecipesSpec

CONFIGS = {"train": (TrainConfig,), "eval": (TrainConfig, EvalConfig), "sweep": (SweepSpec, SweepConfig),
           "plan": (PlanConfig,), "bench": (BenchConfig,), "recipes": (RecipesSpec, SweepConfig),
           "probe": (ProbeSpec,), "ensemble": (EnsembleSpec,)}
# flags that are not a field: where values come from and where a run goes (TrainConfig is hashed, --out is not)
EXTRA = {"train": {"--config", "--out"}, "eval": {"--config"}, "sweep": {"--config", "--preset", "--task-opt"},
         "plan": set(), "bench": set(), "recipes": set(), "probe": set(), "ensemble": set()}
# the flags plan, bench and sweep declared by hand before they were generated (train's and eval's come from
# TrainConfig, which others extend)
BEFORE = {
    "plan": "--model-config --layers --dtype --frozen-dtype --batch-size --seq-len --beta --adam-states "
            "--train-embeddings --train-lm-head --block-path --json",
    "bench": "--models --steps --warmup --rounds --threads --device --no-trl --json",
    "sweep": "--config --out --models --tasks --algos --seeds --layer-set --preset --single-layers "
             "--no-single-layers --full-seeds --extreme-seeds --set --task-opt --executor --workers --address "
             "--num-cpus-per-job --num-gpus-per-job --max-retries --retry-failed",
    "eval": "--out --batch-size --samples --pass-k --config --task-opt",
    "train": "--out --config --task-opt",
}


@pytest.fixture
def help_of(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option

    def run(command: str) -> str:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        return capsys.readouterr().out

    return run


def entries(help_text: str) -> dict[str, str]:
    """{option string: its whole entry (flags, metavar and help on one line)} of a --help text."""
    out, current = {}, []
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = [line.strip()]
            for part in re.split(r"\s{2,}", line.strip())[0].split(", "):
                out[part.split()[0]] = current
        elif line.strip():
            current.append(line.strip())
    return {k: " ".join(v) for k, v in out.items() if k not in ("-h", "--help")}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_a_flag_with_a_real_default(command, help_of):
    text = help_of(command)
    help_ = entries(text)
    fields = {flag_name(f): f for cls in CONFIGS[command] for f in dataclasses.fields(cls)}
    negations = {o for o in help_ if o.startswith("--no-") and "--" + o[5:] in help_}  # --x / --no-x pairs
    assert set(help_) - negations == set(fields) | EXTRA[command]
    for flag, f in fields.items():
        assert f.metadata["doc"] in help_[flag], flag
        assert re.search(r"\((required|repeatable|[^()]*default: .+)\)$", help_[flag]), help_[flag]
    for empty in ("default: None", "default: []", "default: {}", "default: )"):
        assert empty not in text


# flags added since (new features, not renames)
ADDED = {"sweep": {"--pairs", "--lr-grid", "--lr-check-items", "--procs-per-job"}, "plan": {"--nproc", "--parallel"},
         "bench": {"--nproc", "--trl-allocator"}}


@pytest.mark.parametrize("command", sorted(BEFORE))
def test_the_flags_are_those_of_before(command, help_of):
    flags = set(entries(help_of(command)))
    assert set(BEFORE[command].split()) <= flags
    if command in ("plan", "bench", "sweep"):
        assert flags == set(BEFORE[command].split()) | ADDED.get(command, set())


def test_task_defaults_come_from_field_metadata(help_of):
    from onelayer.tasks.agent import AgentTask
    from onelayer.train.setup import TASK_TUNABLE

    assert TASK_TUNABLE == {"prompts_per_step": 16, "max_steps": 300, "learning_rate": 1e-4, "warmup_steps": 0,
                            "check_every": 0}
    assert set(AgentTask.train_defaults) <= set(TASK_TUNABLE)
    text = help_of("train")
    assert "(default: the task's suggestion (16 if it has none; agent tasks 4))" in text
    assert "max new tokens per completion (default: the task's suggestion (64 if it has none))" in text


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv,named", [
    (["train", "--out", "{tmp}/r", "--config", "{yaml}"], "unknown config key 'learning_rat'; did you mean 'learning_rate'"),
    (["eval", "--out", "{tmp}/e.json", "--config", "{yaml}"], "unknown config key 'learning_rat'"),
    (["sweep", "--out", "{tmp}/s", "--set", "lr=1"], "unknown config key 'lr'"),
    (["sweep", "--out", "{tmp}/s", "--config", "{sweep_yaml}"], "unknown sweep key 'modles'; did you mean 'models'"),
    (["train", "--out", "{tmp}/r", "--max-steps", "x"], "config key 'max_steps': 'x' is not a valid int"),
    (["plan", "--model-config", "tiny-qwen3", "--layers", "1", "--batch-size", "x"], "'batch_size': 'x' is not a valid int"),
    (["bench", "--steps", "x"], "'steps': 'x' is not a valid int"),
    (["sweep", "--out", "{tmp}/s", "--workers", "2.5"], "'workers': '2.5' is not a valid int"),
])
def test_unknown_keys_and_bad_types_are_one_line_errors_naming_the_key(argv, named, tmp_path, capsys):
    files = {"tmp": str(tmp_path), "yaml": write(tmp_path, "learning_rat: 1\n"),
             "sweep_yaml": str(tmp_path / "s.yaml")}
    (tmp_path / "s.yaml").write_text("modles: [tiny-qwen3]\n")
    assert main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("cls", [PlanConfig, BenchConfig, EvalConfig, SweepConfig, SweepSpec])
def test_every_config_rejects_unknown_keys_naming_them(cls):
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    with pytest.raises(ConfigError, match="unknown .*'bogus_key'"):
        make_config({**required, "bogus_key": 1}, cls)


def test_one_dtype_vocabulary_everywhere(help_of):
    from onelayer.models.plan import DTYPE_BYTES
    from onelayer.train.precision import DTYPES as TORCH_DTYPES

    dtype_fields = [f for classes in CONFIGS.values() for cls in classes for f in dataclasses.fields(cls)
                    if f.name.endswith("dtype")]
    assert {f.name for f in dtype_fields} == {"dtype", "frozen_dtype"} and len(dtype_fields) == 6  # train, eval, plan
    for f in dtype_fields:
        assert f.metadata["choices"] == DTYPES and f.metadata["aliases"] == DTYPE_ALIASES
    assert tuple(DTYPE_BYTES) == DTYPES == tuple(TORCH_DTYPES) and set(DTYPE_ALIASES.values()) == set(DTYPES)
    for command in ("train", "eval", "plan"):
        text = help_of(command)
        assert "--dtype {float32,bfloat16,float16}" in text and "aliases: fp32, bf16, fp16" in text
    for alias, name in DTYPE_ALIASES.items():  # an alias is recorded under the canonical name
        assert make_config({"dtype": name, "frozen_dtype": alias}).frozen_dtype == name
        assert make_config({"model_config": "m", "layers": "1", "dtype": alias}, PlanConfig).dtype == name
    assert make_config({"model_config": "m", "layers": "1", "adam_states": "fp32"}, PlanConfig).adam_states == "float32"
    with pytest.raises(ConfigError, match="'dtype': must be float32, bfloat16 or float16 .got 'bf17'"):
        make_config({"model_config": "m", "layers": "1", "dtype": "bf17"}, PlanConfig)


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_sweep_flags_reach_the_spec_as_before():
    args = parse("sweep", "--models", "tiny-qwen3,tiny-qwen2", "--seeds", "0,1", "--layer-set", "3,5", "--layer-set",
                 "middle:2", "--single-layers", "0,4", "--full-seeds", "none", "--extreme-seeds", "2",
                 "--set", "max_steps=4", "--set", "dtype=bf16")
    spec = make_spec(_values(args, SweepSpec, {"layer_sets": ["1"], "train": {"top_p": 0.9, "save_model": False}}))
    assert spec.models == ["tiny-qwen3", "tiny-qwen2"] and spec.seeds == [0, 1] and spec.extreme_seeds == [2]
    assert spec.layer_sets == ["1", "3,5", "middle:2"]  # repeated flags add to the file's list
    assert spec.single_layers == [0, 4] and spec.full_seeds == []
    assert spec.train == {"top_p": 0.9, "save_model": False, "max_steps": 4, "dtype": "bf16"}
    assert make_spec(_values(parse("sweep", "--no-single-layers"), SweepSpec)).single_layers is False
    assert make_spec(_values(parse("sweep", "--single-layers"), SweepSpec, {"single_layers": [1]})).single_layers is True
    assert make_spec({}) == SweepSpec()
    run = make_config(_values(parse("sweep", "--executor", "processes", "--workers", "2", "--retry-failed"),
                              SweepConfig), SweepConfig)
    assert (run.executor, run.workers, run.retry_failed, run.out) == ("processes", 2, True, "runs/sweep")


def test_the_shipped_preset_still_loads_and_flags_override_it():
    values = load_yaml(preset_path("smollm2-study"))
    spec = make_spec(_values(parse("sweep", "--set", "max_steps=2", "--seeds", "1"), SweepSpec, values))
    assert spec.models == ["smollm2-135m"] and spec.single_layers == [0, 4, 8, 12, 16, 20, 24, 29]
    assert spec.seeds == [1] and spec.extreme_seeds == [1]
    assert spec.train["max_steps"] == 2 and spec.train["task_opts"] == {"difficulty": 8}


def test_train_eval_plan_and_bench_flags_reach_their_configs():
    args = parse("eval", "--out", "e.json", "--task-opt", "difficulty=3", "--pass-k", "1,5", "--samples", "5",
                 "--no-warm-start", "--dtype", "bf16")
    cfg = make_config(_values(args, TrainConfig, {"task_opts": {"n_eval": 20}, "seed": 2}))
    assert cfg.task_opts == {"n_eval": 20, "difficulty": 3} and cfg.seed == 2 and cfg.warm_start is False
    assert cfg.dtype == "bfloat16"
    ev = make_config(_values(args, EvalConfig), EvalConfig)
    assert (ev.out, ev.samples, ev.pass_k, ev.batch_size) == ("e.json", 5, [1, 5], 256)
    plan = make_config(_values(parse("plan", "--model-config", "qwen3-8b", "--layers", "middle:1",
                                     "--train-lm-head"), PlanConfig), PlanConfig)
    assert (plan.dtype, plan.adam_states, plan.train_lm_head, plan.train_embeddings) == ("bfloat16", "float32", True, False)
    bench = make_config(_values(parse("bench", "--no-trl", "--models", "tiny-qwen3"), BenchConfig), BenchConfig)
    assert bench.no_trl is True and bench.models == ["tiny-qwen3"] and bench.steps == 6
    assert make_config({}, BenchConfig).models == ["tiny-qwen3", "tiny-qwen3-large"]


@pytest.mark.parametrize("argv,message", [
    (["eval", "--out", "x.json", "--samples", "0"], "--samples 0: must be at least 1 (1 = greedy score only)"),
    (["eval", "--out", "x.json", "--pass-k", "1,x"], "--pass-k '1,x': write comma-separated integers, e.g. 1,10"),
    (["eval", "--out", "x.json", "--pass-k", "0"], "--pass-k '0': every k must be a positive integer"),
    (["plan", "--model-config", "qwen3-0.6b", "--layers", "1", "--batch-size", "0"],
     "--batch-size 0: must be a positive integer"),
    (["plan", "--model-config", "qwen3-0.6b", "--layers", "1", "--beta", "-1"], "--beta -1.0: must be >= 0"),
    (["bench", "--models", "nope", "--no-trl"], "--models: 'nope' is not a built-in tiny model or a built-in real model"),
    (["bench", "--warmup", "0", "--no-trl"], "--warmup 0: at least one warm-up step"),
    (["bench", "--rounds", "0", "--no-trl"], "--rounds 0: at least one round"),
    (["sweep", "--executor", "foo"], "unknown executor 'foo'; available: local, processes, ray"),
    (["sweep", "--preset", "smollm2-study", "--config", "x.yaml"], "pass --preset or --config, not both"),
])
def test_validation_messages_are_those_of_before(argv, message, capsys):
    assert main(argv) == 2
    assert f"onelayer: error: {message}" in capsys.readouterr().err


def test_an_abbreviated_flag_is_an_error_not_a_silent_match(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error, exit 2
        main(["train", "--learning-rat", "1", "--out", "x"])
    assert exit_.value.code == 2 and "--learning-rat" in capsys.readouterr().err
