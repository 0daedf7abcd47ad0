"""Run untrusted (model-written) Python programs against their tests, isolated from the host.

``check_program(program, test, entry_point)`` runs one program; ``check_programs(jobs)`` runs many, in
parallel across cores with a bound, several per sandbox start. Every model-written program in onelayer
goes through here and nowhere else.

Isolation layers, strongest first; ``detect_isolation()`` probes the machine once per process and logs
one warning naming whatever is missing (the other layers still apply):

1. **Namespaces** (``unshare``): a new network namespace (no interfaces but a down loopback, so no
   connect and no DNS), pid namespace (the program sees only its sandbox and everything in it dies with
   it), mount namespace (private tmpfs on /tmp, /var/tmp and /dev/shm, the rest of the filesystem
   read-only), IPC and UTS namespaces. As root this needs nothing more; otherwise it needs unprivileged
   user namespaces (``--user --map-root-user``).
2. **Unprivileged uids** (root only): the harness and the program run as two distinct, otherwise unused
   uids picked per sandbox slot, with no supplementary groups and ``no_new_privs``, so RLIMIT_NPROC
   bites, other users' files stay unreadable, and the program cannot signal or trace the harness.
3. **Always**: a new session and process group; rlimits on CPU time, address space, file size, open
   files, processes and core size; a private working directory removed afterwards; a scrubbed
   environment; no stdin; stdout / stderr read up to a cap; a wall-clock timeout per program and a
   deadline for the whole sandbox, after which its process tree is killed.

The verdict comes from the harness process, which never runs program code (see ``_sandbox_runner``):
the test code runs there and calls the program's functions through proxies that pass plain data only.
Each ``assert`` of the test is a *site*; ``passed`` / ``total`` count the sites that ran and never
failed, and the status is ``passed`` only when every site ran and held and no exception escaped the
tests. A run also echoes a per-run random nonce, which the caller checks, so a verdict line cannot come
from anywhere but this run's harness.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from . import _sandbox_runner as runner

log = logging.getLogger("onelayer.sandbox")

STATUSES = ("passed", "failed", "timeout", "error")
RUNNER_SOURCE = Path(runner.__file__).read_text(encoding="utf-8")
NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--uts"]
UID_BASE = 1_900_000_000  # far above any real or subordinate uid range
MAX_SLOTS = 32
MAX_BATCH = 64  # programs per sandbox start
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


@dataclass
class ExecResult:
    """The verdict on one program: ``status`` is one of passed, failed, timeout, error.

    ``error`` is a load error, a failed assertion or the reason for the status; ``passed`` / ``total``
    count assertion sites (``total`` is 0 when the test has no ``assert``).
    """

    status: str
    passed: int = 0
    total: int = 0
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        """Share of assertion sites that passed (1.0 / 0.0 by status when there are none)."""
        if self.total:
            return self.passed / self.total
        return 1.0 if self.ok else 0.0


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program (CPU seconds default to the wall-clock timeout, rounded up, + 1)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    open_files: int = 64
    processes: int = 32
    tmp_mb: int = 64
    output_cap: int = 8192

    def runner_limits(self, extra_processes: int = 0) -> dict:
        d = asdict(self)
        d["cpu_s"] = int(self.timeout_s) + 2
        d["processes"] = self.processes + extra_processes
        return d


@dataclass(frozen=True)
class Isolation:
    """Which isolation layers a sandbox start uses (see the module docstring)."""

    namespaces: bool
    user_namespace: bool
    uid_drop: bool
    private_fs: bool
    interpreter: str
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        ns = ("network, pid, mount, ipc, uts namespaces" + (" (in a user namespace)" if self.user_namespace else "")
              if self.namespaces else "no namespaces")
        fs = "private /tmp + read-only root" if self.private_fs else "host filesystem"
        uid = "separate unprivileged uids" if self.uid_drop else "the caller's uid"
        return f"{ns}; {fs}; {uid}; rlimits; interpreter {self.interpreter}"

    def missing(self) -> list[str]:
        out = []
        if not self.namespaces:
            out.append("network/pid/mount namespaces (programs can open network connections and see host processes)")
        elif not self.private_fs:
            out.append("private /tmp and read-only root (programs can write wherever their uid may)")
        if not self.uid_drop:
            if os.geteuid() == 0:
                out.append("a separate uid (programs run as root inside the sandbox)")
            elif self.namespaces:
                out.append("a separate uid (programs run as the caller, mapped to root in a user namespace, and can "
                           "end the harness, which then reports an error, never a pass)")
            else:
                out.append("a separate uid (programs run as the caller and can signal every process the caller owns; "
                           "RLIMIT_NPROC counts all of them; run as root or enable unprivileged user namespaces)")
        return out


# ---------------------------------------------------------------------------------------------
# test instrumentation


class _Sites(ast.NodeTransformer):
    """Rewrite ``assert test, msg`` into ``__ol_assert__(i, lambda: test, lambda: msg)``."""

    def __init__(self):
        self.n = 0

    def visit_Assert(self, node: ast.Assert):
        i, self.n = self.n, self.n + 1
        no_args = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
        args = [ast.Constant(i), ast.Lambda(args=no_args, body=node.test)]
        if node.msg is not None:
            args.append(ast.Lambda(args=no_args, body=node.msg))
        call = ast.Call(func=ast.Name("__ol_assert__", ast.Load()), args=args, keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def instrument_test(test: str) -> tuple[str, int]:
    """The test source with every ``assert`` routed through the harness, and the number of sites.

    Raises SyntaxError when ``test`` does not parse.
    """
    tree = ast.parse(test)
    sites = _Sites()
    tree = ast.fix_missing_locations(sites.visit(tree))
    return ast.unparse(tree), sites.n


# ---------------------------------------------------------------------------------------------
# isolation detection

_DETECTED: Isolation | None = None
_DETECT_LOCK = threading.Lock()
_PROBE = ("import fractions, json\ndef f(x):\n    return x + 1\n", "import fractions\nassert f(1) == 2\n", "f")


def _interpreters() -> list[str]:
    found = []
    for exe in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", shutil.which("python3")):
        if exe and os.path.exists(exe) and exe not in found:
            found.append(exe)
    return found


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
                for exe in _interpreters():
                    iso = Isolation(**ns, uid_drop=uid_drop, private_fs=ns["namespaces"], interpreter=exe)
                    res, layers = _run_batch([_job(*_PROBE)], Limits(timeout_s=10), iso, slot=MAX_SLOTS - 1)
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


# ---------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class _Job:
    program: str
    test: str
    entry_point: str | None
    sites: int


def _job(program: str, test: str, entry_point: str | None) -> _Job:
    source, sites = instrument_test(test)
    return _Job(program, source, entry_point, sites)


_SLOTS: queue.Queue = queue.Queue()
for _s in range(MAX_SLOTS - 1):  # the last slot is the probe's
    _SLOTS.put(_s)


def _uids(slot: int) -> list[int]:
    base = UID_BASE + (os.getpid() % 100_000) * 2 * MAX_SLOTS + 2 * slot
    return [base, base + 1]


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
    runnable: list[tuple[_Job, list[int]]] = []
    for (program, test, entry), where in unique.items():
        try:
            runnable.append((_job(program, test, entry), where))
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
                return _run_batch([job for job, _ in batch], lim, iso, slot)[0]
            finally:
                _SLOTS.put(slot)

        with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as pool:
            for batch, verdicts in zip(batches, pool.map(one, batches)):
                for (_, where), verdict in zip(batch, verdicts):
                    for i in where:
                        results[i] = replace(verdict)
    return results  # type: ignore[return-value]


def _run_batch(jobs: list[_Job], lim: Limits, iso: Isolation, slot: int) -> tuple[list[ExecResult], dict]:
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
