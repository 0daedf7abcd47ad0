"""The results store: one directory per job under OUT/jobs/, plus results.csv / results.parquet.

A job directory is exactly a run directory (`onelayer.rundir`), with error.txt added when the job failed.
Commands that build on a finished sweep (recipes, ensemble) read its plan and contributions through
`sweep_condition`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from onelayer import rundir
from onelayer.config import ConfigError
from onelayer.io import atomic_write_text, read_json

RESULT_COLUMNS = ["job_id", "condition", "model", "task", "algo", "seed", "layers", "learning_rate", "layer_indices",
                  "num_layers",
                  "status", "score", "ci_low", "ci_high", "base_score", "gain", "gain_ci_low", "gain_ci_high",
                  "n", "trainable_params", "train_seconds", "wall_seconds", "selected_step", "frozen_unchanged",
                  "collapsed",
                  "warm_start_hash", "warm_start_accuracy", "error"]


def job_dir(out: Path, job_id: str) -> Path:
    return Path(out) / "jobs" / job_id


def result_row(out: Path, job) -> dict:
    path = job_dir(out, job.id)
    row = {"job_id": job.id, "condition": job.condition, "model": job.config.model, "task": job.config.task,
           "algo": job.config.algo, "seed": job.seed, "layers": job.layers, "status": rundir.status(path),
           "learning_rate": job.config.learning_rate}
    if row["status"] == "done":
        ev = read_json(path / "eval.json")
        row.update(score=ev["score"], ci_low=ev["ci95"][0], ci_high=ev["ci95"][1], base_score=ev["base_score"],
                   gain=ev["gain"], gain_ci_low=ev["gain_ci95"][0], gain_ci_high=ev["gain_ci95"][1], n=ev["n"],
                   trainable_params=ev["trainable_params"], train_seconds=ev["train_seconds"],
                   wall_seconds=ev.get("wall_seconds", ""), selected_step=ev.get("selected_step", ""),
                   frozen_unchanged=ev["frozen_unchanged"], num_layers=ev["num_layers"],
                   collapsed=bool(ev.get("collapsed", False)),
                   warm_start_hash=(ev.get("warm_start") or {}).get("hash", ""),
                   warm_start_accuracy=(ev.get("warm_start") or {}).get("heldout_accuracy", ""),
                   layer_indices=" ".join(map(str, ev["layer_indices"])))
    elif (path / "error.txt").is_file():
        row["error"] = (path / "error.txt").read_text().strip().splitlines()[-1][:300]
    return row


def write_results(out: Path, jobs) -> list[dict]:
    """results.csv (atomic) and, where pyarrow is installed, results.parquet."""
    rows = [result_row(out, j) for j in jobs]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(out) / "results.csv", buf.getvalue())
    write_parquet(Path(out) / "results.parquet", rows, RESULT_COLUMNS)
    return rows


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return True


def sweep_condition(source: str | Path, condition: str | None, command: str) -> tuple[Path, str, dict]:
    """(contributions file, condition, plan.json) of a finished sweep directory `source`, for the one condition
    (model/task/algo) that `condition` names or, when None, the sweep's only one; a ConfigError (prefixed with
    `command`, the command and its flag) saying what is missing or which conditions there are."""
    src = Path(source)
    contributions = src / "contributions.csv"
    if not contributions.is_file() or not (src / "plan.json").is_file():
        raise ConfigError(f"{command} {str(src)!r}: no contributions.csv and plan.json there; pass the --out "
                          "directory of a finished `onelayer sweep` (its single-layer jobs rank the layers)")
    plan = read_json(src / "plan.json")
    conditions = sorted({j["condition"] for j in plan["jobs"]})
    chosen, command = condition or (conditions[0] if len(conditions) == 1 else None), command.split()[0]
    if chosen not in conditions:
        raise ConfigError(f"{command}: choose --condition, one of {', '.join(conditions)}" if chosen is None else
                          f"{command}: condition {chosen!r} is not in that sweep ({', '.join(conditions)})")
    return contributions, chosen, plan
