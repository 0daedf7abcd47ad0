"""The `onelayer` command line: train and eval (sweep, report and the rest build on these).

Every command's flags are generated from its config dataclasses (`onelayer.config`, `sweep.SweepSpec`), so
every setting has exactly one name, one doc and one default. User errors print one line naming the
problem and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from onelayer.config import (
    BenchConfig,
    ConfigError,
    EvalConfig,
    PlanConfig,
    SweepConfig,
    TrainConfig,
    default_help,
    is_required,
    load_yaml,
    make_config,
)
from onelayer.probe import ProbeSpec
from onelayer.sweep.ensemble import EnsembleSpec
from onelayer.sweep.plan import SweepSpec
from onelayer.sweep.recipes import RecipesSpec

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: no flag abbreviations either."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(f: dataclasses.Field, annotation) -> str:
    """How a field is given on the command line: 'pairs' (KEY=VALUE, repeatable, into a dict), 'items' (a
    repeatable flag, one list item each), 'list' (comma-separated), 'bool' (on/off), 'switch' (on, off or
    a list) or 'value'."""
    kinds = set(typing.get_args(annotation) or (annotation,)) - {type(None)}
    if kinds == {bool, list}:
        return "switch"
    if list in kinds:
        return "items" if f.metadata.get("repeat") else "list"
    return "pairs" if dict in kinds else "bool" if bool in kinds else "value"


def _help(f: dataclasses.Field, kind: str) -> str:
    meta = f.metadata
    if is_required(f):
        note = "required"
    elif kind in ("pairs", "items"):
        note = "repeatable"
    else:
        note = ("comma-separated; " if kind == "list" else "") + f"default: {default_help(f)}"
    if meta.get("aliases"):
        note += f"; aliases: {', '.join(meta['aliases'])}"
    return f"{meta['doc']} ({note})".replace("%", "%%")


def _metavar(f: dataclasses.Field, kind: str) -> str:
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    if kind == "pairs":
        return "KEY=VALUE"
    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    return flag_name(f)[2:].upper().replace("-", "_")


def _add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of the config dataclass `cls` (the metadata it reads: `onelayer.config._f`). Flags
    not given stay out of the namespace, so a config file's value or the field's default stands."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _kind(f, hints[f.name])
        kw = dict(dest=f.name, help=_help(f, kind))
        if is_required(f):
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if f.metadata.get("negatable", True) else "store_true"
        else:
            kw["metavar"] = _metavar(f, kind)
        if kind in ("pairs", "items"):
            kw["action"] = "append"
        elif kind == "switch":
            kw.update(nargs="?", const="true")
        parser.add_argument(flag_name(f), **kw)
        if kind == "switch":
            parser.add_argument("--no-" + flag_name(f)[2:], dest=f.name, action="store_const", const="false",
                                default=argparse.SUPPRESS, help=f.metadata["no_doc"])


def _values(args: argparse.Namespace, cls, values: dict | None = None) -> dict:
    """`values` (cls's keys, e.g. from a YAML file) with the flags given for cls's fields on top: a dict
    flag's KEY=VALUE pairs and a repeatable list flag's items add to the file's, other flags replace."""
    from onelayer.tasks import parse_task_opts

    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in vars(args):
            continue
        given, old, kind = getattr(args, f.name), values.get(f.name), _kind(f, hints[f.name])
        if kind == "pairs":
            parse = _spec_pairs if f.metadata.get("spec_keys") else parse_task_opts
            values[f.name] = {**(old or {}), **parse(given)}
        elif kind == "items":
            values[f.name] = [*(old if isinstance(old, list) else [] if old is None else [old]), *given]
        else:
            values[f.name] = given
    return values


def _spec_pairs(pairs: list[str]) -> dict[str, float]:
    """SPEC=NUMBER pairs whose key is a layer spec (it may hold ':', '@' and ','): split at the last '='."""
    out: dict[str, float] = {}
    for pair in pairs:
        spec, sep, value = pair.rpartition("=")
        try:
            out[spec.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not spec.strip():
            raise ConfigError(f"malformed --layer-lr {pair!r}: write SPEC=MULTIPLIER, e.g. --layer-lr top:3@contributions.csv=2")
    return out


def _config(args: argparse.Namespace, cls=TrainConfig, values: dict | None = None):
    return make_config(_values(args, cls, values), cls)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return _config(args, TrainConfig, load_yaml(args.config) if args.config else {})


def cmd_train(args: argparse.Namespace) -> int:
    from onelayer.train import run
    from onelayer.train.distributed import launch, launched, precheck

    cfg = _train_config(args)
    if cfg.nproc > 1 and not launched():  # this process starts the job's processes (torchrun) and waits
        precheck(cfg, args.out)  # bad input fails here, in one line, before any process starts
        return launch(args.argv, cfg.nproc)
    run(cfg, args.out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from onelayer.train.eval_cmd import evaluate_model

    cfg, ev = _train_config(args), _config(args, EvalConfig)
    evaluate_model(cfg, ev.out, batch_size=ev.batch_size, samples=ev.samples, pass_k=tuple(ev.pass_k))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from onelayer.sweep import make_spec, run_sweep
    from onelayer.tasks import parse_task_opts

    if args.preset and args.config:
        raise ConfigError("pass --preset or --config, not both (a preset is a shipped --config file)")
    values = load_yaml(preset_path(args.preset) if args.preset else args.config) if (args.preset or args.config) else {}
    values = _values(args, SweepSpec, values)
    if args.task_opt:
        train = dict(values.get("train") or {})
        values["train"] = {**train, "task_opts": {**train.get("task_opts", {}), **parse_task_opts(args.task_opt)}}
    run = _config(args, SweepConfig)
    spec = make_spec(values)
    rows = run_sweep(spec, run.out, executor=run.executor, workers=run.workers, retry_failed=run.retry_failed,
                     address=run.address, num_cpus=run.num_cpus_per_job, num_gpus=run.num_gpus_per_job,
                     procs_per_job=run.procs_per_job,
                     max_retries=run.max_retries)
    failed = [r for r in rows if r["status"] != "done"]
    print(f"{len(rows) - len(failed)} of {len(rows)} jobs done"
          + (f"; not done: {', '.join(r['job_id'] for r in failed)}" if failed else ""))
    return 0 if not failed else 1


def cmd_recipes(args: argparse.Namespace) -> int:
    from onelayer.sweep.recipes import run_recipes

    run = _config(args, SweepConfig)
    rows = run_recipes(_config(args, RecipesSpec), run, out=run.out if "out" in vars(args) else None)
    return 0 if rows else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from onelayer.probe import run_probes

    run_probes(_config(args, ProbeSpec))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from onelayer.sweep.ensemble import run_ensemble

    run_ensemble(_config(args, EnsembleSpec))
    return 0


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

    cfg = _config(args, PlanConfig)
    plan = plan_memory(**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "json"})
    print(format_plan(plan))
    if cfg.json:
        atomic_write_json(cfg.json, plan)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from onelayer.bench import format_report, run_bench
    from onelayer.io import atomic_write_json

    cfg = _config(args, BenchConfig)
    result = run_bench(tuple(cfg.models), steps=cfg.steps, warmup=cfg.warmup, threads=cfg.threads, device=cfg.device,
                       with_trl=not cfg.no_trl, rounds=cfg.rounds, nproc=cfg.nproc, trl_allocator=cfg.trl_allocator,
                       log=lambda msg: print(msg, file=sys.stderr))
    print(format_report(result))
    if cfg.json:
        atomic_write_json(cfg.json, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: a shortened or mistyped flag (--learning-rat) is an error, not a silent match
    parser = argparse.ArgumentParser(prog="onelayer", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="RL-train the selected layers of a model on a task")
    _add_config_flags(p, TrainConfig)
    p.add_argument("--config", help="YAML file of config keys; flags override it")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, eval.json, model/)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="score a model on a task's held-out split (greedy; agent tasks: success rate)")
    _add_config_flags(p, TrainConfig)
    p.add_argument("--config", help="YAML file of config keys; flags override it")
    _add_config_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep", help="base, full and per-layer RL runs, then layer contributions")
    p.add_argument("--config", help="YAML sweep spec (models, tasks, algos, seeds, layer_sets, single_layers, train)")
    p.add_argument("--preset", help="a shipped sweep spec, e.g. smollm2-study (flags still override it)")
    _add_config_flags(p, SweepSpec)
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="task option (repeatable)")
    _add_config_flags(p, SweepConfig)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("recipes", help="layer-aware recipes from a sweep's contributions (Only-Bk, Boost-Bk, Mid-k, "
                                       "worst-k, random-k vs full), run as one sweep; writes recipes.csv")
    _add_config_flags(p, RecipesSpec)
    _add_config_flags(p, SweepConfig)
    next(a for a in p._actions if a.dest == "out").help = "sweep directory of the recipes (default: FROM/recipes)"
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("probe", help="rank layers without a sweep (short runs, RL-gradient norms, block influence) "
                                     "within a FLOP budget; --validate SWEEP checks the ranking against its C_l")
    _add_config_flags(p, ProbeSpec)
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("ensemble", help="majority vote over a sweep's top-k single-layer models against full RL and "
                                        "its k-sample self-consistency vote; writes ensemble.csv")
    _add_config_flags(p, EnsembleSpec)
    p.set_defaults(func=cmd_ensemble)
    p = sub.add_parser("report", help="rebuild contributions.csv, summary.json, plots and report.html from a sweep")
    p.add_argument("dir", help="sweep directory")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="Spearman/Kendall rank correlation of contribution profiles (permutation p-values)")
    p.add_argument("dirs", nargs="+", help="sweep directories (one: compare its conditions; several: across sweeps)")
    p.add_argument("--n-perm", type=int, default=2000, help="permutations for the p-values")
    p.add_argument("--json", help="also write the full result (matrices, nulls) to this JSON file")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("plan", help="memory of full vs selected-layer training, from a config on the meta device (no weights)")
    _add_config_flags(p, PlanConfig)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("bench", help="time onelayer's RL step (full and single middle layer) against TRL's GRPOTrainer")
    _add_config_flags(p, BenchConfig)
    p.set_defaults(func=cmd_bench)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from onelayer.analysis.compare import CompareError
    from onelayer.bench import BenchError
    from onelayer.models import ModelError
    from onelayer.models.layer_spec import LayerSpecError
    from onelayer.tasks import TaskError
    from onelayer.train.checkpoint import CheckpointError
    from onelayer.train.warmstart import WarmStartError

    return ConfigError, LayerSpecError, TaskError, ModelError, WarmStartError, CompareError, BenchError, CheckpointError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
