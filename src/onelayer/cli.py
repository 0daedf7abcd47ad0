"""The `onelayer` command line: train and eval (sweep, report and the rest build on these).

Flags are generated from the config dataclass, so every setting has exactly one name and one doc.
User errors print one line naming the problem and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from onelayer.config import ConfigError, TrainConfig, field_docs, load_yaml, make_config

EXIT_USER_ERROR = 2


def _add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "task_opts":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs[f.name]} (default: {default})"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)
    parser.add_argument("--task-opt", dest="task_opt", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (repeatable), e.g. --task-opt difficulty=3")
    parser.add_argument("--config", help="YAML file of config keys; flags override it")


def _config_from_args(args: argparse.Namespace, skip=("command", "func", "config", "task_opt", "out")) -> TrainConfig:
    from onelayer.tasks import parse_task_opts

    values = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in skip and not k.startswith("_")})
    if args.task_opt:
        values["task_opts"] = {**(values.get("task_opts") or {}), **parse_task_opts(args.task_opt)}
    return make_config(values)


def cmd_train(args: argparse.Namespace) -> int:
    from onelayer.train import run

    cfg = _config_from_args(args)
    run(cfg, args.out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from onelayer.train.eval_cmd import evaluate_model

    cfg = _config_from_args(args, skip=("command", "func", "config", "task_opt", "out", "batch_size", "samples", "pass_k"))
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be at least 1 (1 = greedy score only)")
    try:
        pass_k = tuple(int(k) for k in args.pass_k.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--pass-k {args.pass_k!r}: write comma-separated integers, e.g. 1,10") from None
    if not pass_k or min(pass_k) < 1:
        raise ConfigError(f"--pass-k {args.pass_k!r}: every k must be a positive integer")
    evaluate_model(cfg, args.out, batch_size=args.batch_size, samples=args.samples, pass_k=pass_k)
    return 0


def _csv_list(text: str) -> list:
    return [int(x) if x.strip().lstrip("-").isdigit() else x.strip() for x in text.split(",") if x.strip()]


def cmd_sweep(args: argparse.Namespace) -> int:
    from onelayer.sweep import EXECUTORS, make_spec, run_sweep
    from onelayer.tasks import parse_task_opts

    if args.preset and args.config:
        raise ConfigError("pass --preset or --config, not both (a preset is a shipped --config file)")
    values = load_yaml(preset_path(args.preset) if args.preset else args.config) if (args.preset or args.config) else {}
    if args.extreme_seeds is not None:
        values["extreme_seeds"] = _csv_list(args.extreme_seeds)
    if args.full_seeds is not None:
        values["full_seeds"] = [] if args.full_seeds.strip().lower() == "none" else _csv_list(args.full_seeds)
    for key in ("models", "tasks", "algos", "seeds"):
        if getattr(args, key) is not None:
            values[key] = _csv_list(getattr(args, key))
    if args.layer_set:
        values["layer_sets"] = [*values.get("layer_sets", []), *args.layer_set]
    if args.single_layers is not None:
        values["single_layers"] = args.single_layers
    train = dict(values.get("train") or {})
    train.update(parse_task_opts(args.set))
    if args.task_opt:
        train["task_opts"] = {**train.get("task_opts", {}), **parse_task_opts(args.task_opt)}
    values["train"] = train
    if args.executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {args.executor!r}; available: {', '.join(EXECUTORS)}")
    spec = make_spec(values)
    rows = run_sweep(spec, args.out, executor=args.executor, workers=args.workers, retry_failed=args.retry_failed,
                     address=args.address, num_cpus=args.num_cpus_per_job, num_gpus=args.num_gpus_per_job,
                     max_retries=args.max_retries)
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} of {len(rows)} jobs done" + (f"; not done: {', '.join(r['job_id'] for r in failed)}" if failed else ""))
    return 0 if not failed else 1


def preset_path(name: str):
    """The shipped sweep YAML of a preset name (onelayer/sweep/presets/NAME.yaml)."""
    from pathlib import Path

    presets = Path(__file__).parent / "sweep" / "presets"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in presets.glob("*.yaml")))
        raise ConfigError(f"unknown sweep preset {name!r}; shipped presets: {names}")
    return path


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from onelayer.analysis.report import build_report
    from onelayer.analysis.summary import summarize

    if not (Path(args.dir) / "jobs").is_dir():
        raise ConfigError(f"{args.dir!r} is not a sweep directory (no jobs/ inside); pass the --out of a sweep")
    summarize(args.dir)
    print(f"report: {build_report(args.dir)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from onelayer.analysis.compare import compare, format_comparison
    from onelayer.io import atomic_write_json

    result = compare(args.dirs, n_perm=args.n_perm)
    print(format_comparison(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from onelayer.io import atomic_write_json
    from onelayer.models.plan import format_plan, plan_memory

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be a positive integer")
    if args.beta < 0:
        raise ConfigError(f"--beta {args.beta}: must be >= 0")
    plan = plan_memory(args.model_config, args.layers, dtype=args.dtype, frozen_dtype=args.frozen_dtype,
                       batch_size=args.batch_size, seq_len=args.seq_len, beta=args.beta,
                       train_embeddings=args.train_embeddings, train_lm_head=args.train_lm_head,
                       block_path=args.block_path, adam_states=args.adam_states)
    print(format_plan(plan))
    if args.json:
        atomic_write_json(args.json, plan)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from onelayer.bench import format_report, run_bench
    from onelayer.io import atomic_write_json
    from onelayer.models import BUILTIN_MODELS, known_models
    from onelayer.models.real import REAL_MODELS

    models = tuple(_csv_list(args.models))
    for m in models:
        if m not in BUILTIN_MODELS and m not in REAL_MODELS:
            raise ConfigError(f"--models: {m!r} is not a built-in tiny model or a built-in real model; choose from "
                              f"{known_models()}")
    if args.warmup < 1:
        raise ConfigError(f"--warmup {args.warmup}: at least one warm-up step")
    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds}: at least one round")
    result = run_bench(models, steps=args.steps, warmup=args.warmup, threads=args.threads, device=args.device,
                       with_trl=not args.no_trl, rounds=args.rounds, log=lambda msg: print(msg, file=sys.stderr))
    print(format_report(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onelayer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="RL-train the selected layers of a model on a task")
    _add_config_flags(p)
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, eval.json, model/)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="score a model on a task's held-out split (greedy; agent tasks: success rate)")
    _add_config_flags(p)
    p.add_argument("--out", required=True, help="JSON file for score, ci95, n, task")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generation batch")
    p.add_argument("--samples", type=int, default=1,
                   help="also sample this many completions per item and report pass@k (unbiased estimator)")
    p.add_argument("--pass-k", default="1,10,100", help="comma-separated k for pass@k (those <= --samples)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep", help="base, full and per-layer RL runs, then layer contributions")
    p.add_argument("--config", help="YAML sweep spec (models, tasks, algos, seeds, layer_sets, single_layers, train)")
    p.add_argument("--out", default="runs/sweep", help="sweep directory (default: runs/sweep)")
    p.add_argument("--models", help="comma-separated models (default: tiny-qwen3)")
    p.add_argument("--tasks", help="comma-separated tasks (default: arith)")
    p.add_argument("--algos", help="comma-separated algorithms (default: grpo)")
    p.add_argument("--seeds", help="comma-separated seeds (default: 0)")
    p.add_argument("--layer-set", action="append", default=[], help="extra layer spec to run (repeatable)")
    p.add_argument("--preset", help="a shipped sweep spec, e.g. smollm2-study (flags still override it)")
    p.add_argument("--single-layers", nargs="?", const="true", default=None, metavar="LIST",
                   help="one job per layer: every block, or only those listed (e.g. 0,4,8,12)")
    p.add_argument("--no-single-layers", dest="single_layers", action="store_const", const="false",
                   help="no single-layer jobs")
    p.add_argument("--full-seeds", metavar="SEEDS",
                   help="also run the full-parameter job with these seeds (default: 1, so S_full - S_base has two "
                        "seeds; 'none' for no extra seeds)")
    p.add_argument("--extreme-seeds", metavar="SEEDS",
                   help="after the first pass, rerun full and the best and worst single layer with these seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config key for every job (repeatable)")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--executor", default="local", help="local, processes or ray")
    p.add_argument("--workers", type=int, default=1, help="worker processes for --executor processes")
    p.add_argument("--address", help="--executor ray: cluster address ('auto' or HOST:PORT; default: start a local Ray)")
    p.add_argument("--num-cpus-per-job", type=float, default=1, help="--executor ray: CPUs each job declares (default 1)")
    p.add_argument("--num-gpus-per-job", type=float, default=0, help="--executor ray: GPUs each job declares (default 0)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="--executor ray: retries of a job whose worker crashed or that failed (default 2)")
    p.add_argument("--retry-failed", action="store_true", help="restart jobs that failed before from scratch (default: resume them from their checkpoint)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="rebuild contributions.csv, summary.json, plots and report.html from a sweep")
    p.add_argument("dir", help="sweep directory")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="Spearman/Kendall rank correlation of contribution profiles (permutation p-values)")
    p.add_argument("dirs", nargs="+", help="sweep directories (one: compare its conditions; several: across sweeps)")
    p.add_argument("--n-perm", type=int, default=2000, help="permutations for the p-values")
    p.add_argument("--json", help="also write the full result (matrices, nulls) to this JSON file")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("plan", help="memory of full vs selected-layer training, from a config on the meta device (no weights)")
    p.add_argument("--model-config", required=True,
                   help="shipped name (qwen3-0.6b/1.7b/4b/8b, qwen2.5-1.5b/7b), built-in tiny model, config.json or its directory")
    p.add_argument("--layers", required=True, help="layer spec to compare with full training: all, 7, 3,5, 2-5, -1, middle:k, top:k@FILE")
    plan_dtypes = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
    p.add_argument("--dtype", default="bf16", choices=plan_dtypes,
                   help="compute dtype, as train --dtype: activations and KV cache (default bf16)")
    p.add_argument("--frozen-dtype", choices=plan_dtypes,
                   help="storage dtype of frozen tensors, as train --frozen-dtype (default: --dtype)")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch: sequences per forward/backward pass (default 64)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence, prompt + completion (default 1024)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 adds a reference copy of the trainable tensors")
    p.add_argument("--adam-states", default="fp32", choices=("fp32", "weights"),
                   help="fp32 (default; what onelayer train does): trainable weights, gradients and AdamW moments "
                        "fp32, 16 bytes per trainable parameter, no separate master copy; weights: for comparison, "
                        "AdamW run directly on --dtype weights (trainable weights, gradients and moments at --dtype, "
                        "no fp32 anywhere) - loses small updates; not what onelayer trains with")
    p.add_argument("--train-embeddings", action="store_true", help="as in train: also train the input embeddings")
    p.add_argument("--train-lm-head", action="store_true", help="as in train: also train the LM head")
    p.add_argument("--block-path", help="dotted path of the decoder blocks' ModuleList, if discovery fails")
    p.add_argument("--json", help="also write the plan (full, selected, assumptions) to this JSON file")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("bench", help="time onelayer's RL step (full and single middle layer) against TRL's GRPOTrainer")
    p.add_argument("--models", default="tiny-qwen3,tiny-qwen3-large",
                   help="comma-separated built-in models: tiny (tiny-qwen3, tiny-qwen3-large, tiny-qwen2) or real (smollm2-135m)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (medians; at least 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="repeat every run this often, in alternating order (pooled)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every run (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-trl", action="store_true", help="time onelayer alone (no TRL installed)")
    p.add_argument("--json", help="write the results (ratios at the top level, per-model runs under 'models')")
    p.set_defaults(func=cmd_bench)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from onelayer.models import ModelError
    from onelayer.models.layer_spec import LayerSpecError
    from onelayer.tasks import TaskError
    from onelayer.train.warmstart import WarmStartError

    from onelayer.analysis.compare import CompareError
    from onelayer.bench import BenchError

    return ConfigError, LayerSpecError, TaskError, ModelError, WarmStartError, CompareError, BenchError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from onelayer.train import TrainingError

    try:
        return args.func(args)
    except user_errors() as exc:
        print(f"onelayer: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as exc:
        print(f"onelayer: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onelayer: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
