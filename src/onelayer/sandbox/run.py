"""Run programs against their tests: pick the isolation once per process, then spread jobs over
sandbox starts running in parallel."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .batch import MAX_SLOTS, Job, make_job, run_batch
from .isolation import Isolation, Limits, interpreters
from .verdict import ExecResult

log = logging.getLogger("onelayer.sandbox")

MAX_BATCH = 64  # programs per sandbox start

_DETECTED: Isolation | None = None
_DETECT_LOCK = threading.Lock()
_PROBE = ("import fractions, json\ndef f(x):\n    return x + 1\n", "import fractions\nassert f(1) == 2\n", "f")


def detect_isolation(refresh: bool = False) -> Isolation:
    """Probe the strongest isolation this machine allows (once per process) and warn about the rest."""
    global _DETECTED
    with _DETECT_LOCK:
        if _DETECTED is not None and not refresh:
            return _DETECTED
        root = os.geteuid() == 0
        have_unshare = shutil.which("unshare") is not None
        notes = []
        options = []
        if have_unshare:
            options.append(dict(namespaces=True, user_namespace=not root))
        else:
            notes.append("the unshare command is not installed (util-linux)")
        options.append(dict(namespaces=False, user_namespace=False))
        chosen = None
        for ns in options:
            for uid_drop in ([True, False] if root else [False]):
                for exe in interpreters():
                    iso = Isolation(**ns, uid_drop=uid_drop, private_fs=ns["namespaces"], interpreter=exe)
                    res, layers = run_batch([make_job(*_PROBE)], Limits(timeout_s=10), iso, slot=MAX_SLOTS - 1)
                    if res[0].status == "passed":
                        chosen = replace(iso, private_fs=bool(layers.get("private_fs")))
                        if ns["namespaces"] and not chosen.private_fs:
                            notes.append(f"private mounts failed: {layers.get('private_fs_error', 'unknown error')}")
                        break
                    notes.append(f"{'namespaces' if ns['namespaces'] else 'plain'} + "
                                 f"{'uid drop' if uid_drop else 'own uid'} + {exe}: {res[0].error[-300:]}")
                if chosen:
                    break
            if chosen:
                break
        if chosen is None:
            raise RuntimeError("the code sandbox cannot start any Python interpreter on this machine:\n" + "\n".join(notes))
        chosen = replace(chosen, notes=tuple(notes))
        missing = chosen.missing()
        if missing:
            log.warning("code sandbox: running without %s; the other limits still apply. Active: %s",
                        "; ".join(missing), chosen.describe())
        else:
            log.info("code sandbox: %s", chosen.describe())
        _DETECTED = chosen
        return chosen


_SLOTS: queue.Queue = queue.Queue()
for _s in range(MAX_SLOTS - 1):  # the last slot is the probe's
    _SLOTS.put(_s)


def check_program(program: str, test: str, entry_point: str | None = None, timeout_s: float = 10.0,
                  **limits) -> ExecResult:
    """Run ``program`` then ``test`` (and ``check(entry_point)`` when the test defines ``check``)."""
    return check_programs([(program, test, entry_point)], timeout_s=timeout_s, **limits)[0]


def check_programs(jobs: Sequence[tuple[str, str, str | None]], *, timeout_s: float = 10.0,
                   workers: int | None = None, isolation: Isolation | None = None, **limits) -> list[ExecResult]:
    """Verdicts for ``(program, test, entry_point)`` jobs, in order; identical jobs run once.

    ``workers`` bounds the sandboxes running at once (default: the number of cores); each sandbox
    runs up to ``MAX_BATCH`` programs one after another, each in a fresh process. ``limits`` override
    fields of ``Limits`` (``memory_mb=512``, …).
    """
    lim = Limits(timeout_s=timeout_s, **limits)
    iso = isolation or detect_isolation()
    results: list[ExecResult | None] = [None] * len(jobs)
    unique: dict[tuple, list[int]] = {}
    for i, (program, test, entry) in enumerate(jobs):
        unique.setdefault((program, test, entry), []).append(i)
    runnable: list[tuple[Job, list[int]]] = []
    for (program, test, entry), where in unique.items():
        try:
            runnable.append((make_job(program, test, entry), where))
        except SyntaxError as e:
            for i in where:
                results[i] = ExecResult("error", error=f"the test code does not parse: {e}")
    if runnable:
        workers = max(1, min(workers or os.cpu_count() or 1, MAX_SLOTS - 1))
        per = max(1, min(MAX_BATCH, -(-len(runnable) // workers)))
        batches = [runnable[k:k + per] for k in range(0, len(runnable), per)]

        def one(batch):
            slot = _SLOTS.get()
            try:
                return run_batch([job for job, _ in batch], lim, iso, slot)[0]
            finally:
                _SLOTS.put(slot)

        with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as pool:
            for batch, verdicts in zip(batches, pool.map(one, batches)):
                for (_, where), verdict in zip(batch, verdicts):
                    for i in where:
                        results[i] = replace(verdict)
    return results  # type: ignore[return-value]

