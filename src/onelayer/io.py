"""Atomic file writes and JSON-lines helpers: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing any previous version."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def append_jsonl(path: str | Path, obj) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, default=_json_default) + "\n")
        fh.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn last line left by a killed writer."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def cache_root() -> Path:
    """onelayer's cache: ``$ONELAYER_CACHE``, else ``$XDG_CACHE_HOME/onelayer`` (default ``~/.cache/onelayer``)."""
    env = os.environ.get("ONELAYER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "onelayer"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (created, with its folder, if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(final: Path, marker: str, build) -> Path:
    """``final``, a cached directory that ``build(tmp)`` fills: built once under a file lock (concurrent
    processes wait, then reuse it), into a temporary directory moved into place whole. ``marker`` is the
    file whose presence means the directory is complete."""
    if (final / marker).is_file():
        return final
    with file_lock(final.with_name(final.name + ".lock")):
        if (final / marker).is_file():  # another process built it while we waited
            return final
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)
    return final


def slug(text: str) -> str:
    """`text` as a file- and id-safe word: runs of other characters become '-', at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40]
