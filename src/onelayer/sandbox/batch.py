"""One sandbox start: launch the runner on a batch of jobs, feed it, collect its verdicts, then
kill whatever is left of its process tree."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import runner
from .isolation import NAMESPACE_FLAGS, Isolation, Limits
from .verdict import STATUSES, ExecResult, instrument_test

RUNNER_SOURCE = Path(runner.__file__).read_text(encoding="utf-8")
UID_BASE = 1_900_000_000  # far above any real or subordinate uid range
MAX_SLOTS = 32
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


@dataclass(frozen=True)
class Job:
    """One program and its instrumented test (``sites`` asserts), as a sandbox start runs it."""

    program: str
    test: str
    entry_point: str | None
    sites: int


def make_job(program: str, test: str, entry_point: str | None) -> Job:
    source, sites = instrument_test(test)
    return Job(program, source, entry_point, sites)


def _uids(slot: int) -> list[int]:
    base = UID_BASE + (os.getpid() % 100_000) * 2 * MAX_SLOTS + 2 * slot
    return [base, base + 1]


def run_batch(jobs: list[Job], lim: Limits, iso: Isolation, slot: int) -> tuple[list[ExecResult], dict]:
    """Start one sandbox for ``jobs``; return their verdicts and the layers the launcher reported."""
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="onelayer-sandbox-")
    uids = _uids(slot) if iso.uid_drop else None
    pipes = {name: os.pipe() for name in ("programs", "tests", "report")}
    own = {fd for pair in pipes.values() for fd in pair}  # fds this thread must still close
    cfg = {
        "fds": {"programs": pipes["programs"][0], "tests": pipes["tests"][0], "report": pipes["report"][1]},
        "private_fs": iso.namespaces, "uids": uids, "workdir": workdir, "n_items": len(jobs),
        "limits": lim.runner_limits(0 if uids or iso.namespaces else _own_process_count()),
        "timeout_s": lim.timeout_s, "output_cap": lim.output_cap, "env": _ENV,
    }
    argv = [iso.interpreter, "-s", "-c", RUNNER_SOURCE, json.dumps(cfg)]
    if iso.namespaces:
        argv = ["unshare"] + (["--user", "--map-root-user"] if iso.user_namespace else []) + NAMESPACE_FLAGS + ["--"] + argv
    started = time.monotonic()
    deadline = started + len(jobs) * (lim.timeout_s + 0.5) + 10.0
    verdicts: dict[int, dict] = {}
    layers: dict = {}
    stderr = bytearray()
    proc = None
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=cfg["fds"].values(), start_new_session=True, env=_ENV, cwd="/")
        for fd in cfg["fds"].values():
            os.close(fd)
            own.discard(fd)
        for name, payload in (("programs", [j.program for j in jobs]), ("tests", {"nonce": nonce, "items": [
                {"test": j.test, "entry_point": j.entry_point, "sites": j.sites} for j in jobs]})):
            own.discard(pipes[name][1])
            _feed(pipes[name][1], payload)  # the feeder thread closes it
        done = _collect(pipes["report"][0], proc, deadline, nonce, verdicts, stderr)
        if done is not None:
            layers = done.get("layers", {})
    except OSError as e:
        stderr += f"cannot start the sandbox: {e}".encode()
    finally:
        for fd in own:
            os.close(fd)
        if proc is not None:
            _stop(proc, graceful=bool(layers) or len(verdicts) == len(jobs))
        if uids and not iso.namespaces:  # in a pid namespace everything already died with its init
            _kill_uids(uids)
        shutil.rmtree(workdir, ignore_errors=True)
    timed_out = time.monotonic() >= deadline
    out = []
    for i, job in enumerate(jobs):
        v = verdicts.get(i)
        if v is None:
            first_missing = all(k in verdicts for k in range(i))
            if timed_out and first_missing:
                out.append(ExecResult("timeout", 0, job.sites, error=f"time limit of {lim.timeout_s:g} s exceeded"))
            else:
                why = stderr.decode("utf-8", "replace").strip()[-1500:] or "the sandbox stopped before this program ran"
                out.append(ExecResult("error", 0, job.sites, error=f"sandbox failure: {why}"))
            continue
        status = v.get("status") if v.get("status") in STATUSES else "error"
        out.append(ExecResult(status, int(v.get("passed", 0)), int(v.get("total", job.sites)), str(v.get("stdout", "")),
                              str(v.get("stderr", "")), str(v.get("error", "")), float(v.get("seconds", 0.0))))
    return out, layers


def _feed(fd: int, payload) -> None:
    """Write ``payload`` as JSON to a pipe from a thread (it may exceed the pipe buffer), then close it."""
    data = json.dumps(payload).encode()

    def write():
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
        except OSError:
            pass

    threading.Thread(target=write, daemon=True).start()


def _collect(report_fd: int, proc: subprocess.Popen, deadline: float, nonce: str, verdicts: dict,
             stderr: bytearray) -> dict | None:
    """Read verdict lines until the harness says done, the sandbox exits, or the deadline passes."""
    sel = selectors.DefaultSelector()
    sel.register(report_fd, selectors.EVENT_READ, "report")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    buf = bytearray()
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for key, _ in sel.select(min(left, 1.0)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == "stderr":
                    stderr += chunk[: max(0, 8192 - len(stderr))]
                    continue
                buf += chunk
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict) or msg.get("nonce") != nonce:
                        continue
                    if msg.get("done"):
                        return msg
                    if isinstance(msg.get("i"), int):
                        verdicts[msg["i"]] = msg
        return None
    finally:
        sel.close()


def _stop(proc: subprocess.Popen, graceful: bool) -> None:
    """Let a finished sandbox exit, or kill it: its launcher first (which takes down its pid
    namespace, reaped by ``unshare``), then whatever else descends from it."""
    if graceful:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        children = [pid for pid in runner._descendants(proc.pid)]
        for pid in children[:1] + children[1:][::-1]:
            _kill(pid)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            _kill(proc.pid)
            for pid in runner._descendants(proc.pid):
                _kill(pid)
            proc.wait(timeout=5)
    if proc.stderr:
        proc.stderr.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uids(uids: list[int]) -> None:
    """Kill any process left running under the sandbox's uids (root only; they are ours alone)."""
    wanted = {str(u) for u in uids}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uid_line = next(line for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid_line.split()[1] in wanted:
            _kill(int(entry))


def _own_process_count() -> int:
    uid = str(os.getuid())
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    if next(line for line in f if line.startswith("Uid:")).split()[1] == uid:
                        n += 1
            except (OSError, StopIteration):
                pass
    return n
