"""The isolation layers of a sandbox start, and the resource limits of one program.

Isolation layers, strongest first; ``detect_isolation()`` (in ``run``) probes the machine once per
process and logs one warning naming whatever is missing (the other layers still apply):

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
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--uts"]


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


def interpreters() -> list[str]:
    """The Python interpreters a sandbox may start, in the order they are tried."""
    found = []
    for exe in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", shutil.which("python3")):
        if exe and os.path.exists(exe) and exe not in found:
            found.append(exe)
    return found
