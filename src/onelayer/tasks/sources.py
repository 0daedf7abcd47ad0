"""Rows of a file-backed task's data: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a Hugging Face
hub dataset (``"name"`` or ``"name:split"``) when the source does not exist locally and does not look
like a file name (``datasets`` is imported only then; ``.parquet`` needs pyarrow).

Rows come back as (location, row) pairs, the location ("line 3" / "row 3") for error messages and
item ids. Used by the file-backed tasks (``tasks.mathdata``, ``tasks.code.jsonl``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import TaskError

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _read_local(path: Path, where: str) -> list[tuple[str, dict]]:
    """Rows of a local file as (location, row) pairs; the location reads "line 3" / "row 3"."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{where} line {lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
                out.append((f"line {lineno}", row))
        return out
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: invalid JSON ({e.msg} at line {e.lineno}); "
                            f"a .json file must hold a list of objects") from None
        if not isinstance(data, list):
            raise TaskError(f"{where}: a .json file must hold a list of objects, got {type(data).__name__} "
                            f"(use .jsonl for one object per line)")
        return [(f"row {i}", row) for i, row in enumerate(data, 1)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskError(f"{where}: reading .parquet needs pyarrow (pip install pyarrow), "
                            f"or convert the file to .jsonl") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise TaskError(f"{where}: cannot read parquet ({type(e).__name__}: {e})") from None
        return [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    raise TaskError(f"{where}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet")


def _load_hub(name: str, split: str, task: str, subset: str | None) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"{task}: {name!r} is not a local file, and loading it as a hub dataset needs the `datasets` "
            f"package (pip install datasets); or pass a local .jsonl/.json/.parquet file"
        ) from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise TaskError(
            f"{task}: could not load {name!r} (split {split!r}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}); the hub is unreachable or the name/split is wrong — "
            f"pass a local .jsonl/.json/.parquet file instead (task option path=FILE)"
        ) from None
    return [(f"row {i}", dict(row)) for i, row in enumerate(ds, 1)]


def looks_like_file(source: str) -> bool:
    return source.lower().endswith(_FILE_SUFFIXES) or source.startswith((".", "/", "~"))


def split_hub_name(source: str) -> tuple[str, str | None]:
    name, sep, split = source.partition(":")
    return name, (split or None) if sep else None


def read_source(source: str, task: str, subset: str | None, default_split: str) -> tuple[str, str, list[tuple[str, dict]]]:
    """(tag, where, rows) of a local file or hub dataset: the tag prefixes item ids, ``where``
    starts error messages ("gsm8k file data.jsonl")."""
    path = Path(source).expanduser()
    if path.is_file():
        where = f"{task} file {source}"
        return path.stem, where, _read_local(path, where)
    if path.exists():
        raise TaskError(f"{task}: {source!r} is a directory; pass a .jsonl, .json or .parquet file")
    if looks_like_file(source):
        raise TaskError(f"{task}: file {source!r} not found (checked relative to {os.getcwd()})")
    name, split = split_hub_name(source)
    split = split or default_split
    return f"{name}:{split}", f"{task} dataset {name}:{split}", _load_hub(name, split, task, subset)
