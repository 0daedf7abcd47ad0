"""The process tree inside the code sandbox; standard library only, run as ``python -c <this file>``.

``onelayer.sandbox.batch`` starts this script (inside fresh namespaces where the machine allows) with a
JSON config as its only argument. Nothing secret is on the command line: the programs and the tests
arrive on two separate pipes, and verdicts leave on a third.

The launcher (pid 1 of the new pid namespace, still root there) makes /tmp, /var/tmp and /dev/shm
private tmpfs mounts and the rest of the filesystem read-only, then splits into two processes that
never share memory:

- the **harness** (uid ``uids[0]``) reads only the tests. For each item it asks the zygote for a fresh
  program process, runs the instrumented test code itself, and writes one JSON verdict line per item to
  the report pipe. Test code calls the program's functions through proxies; arguments go over a
  socket, and only plain data (None, bool, int, float, complex, str, bytes and lists / tuples / sets /
  dicts of them) comes back. So the program never runs in the harness, cannot see the tests, and
  cannot touch the verdict: exiting early, printing "PASS", atexit / excepthook tricks, patching
  builtins or returning an object whose ``__eq__`` always says True earn nothing.
- the **zygote** (uid ``uids[1]``) reads only the programs. For each item it kills whatever the
  previous program left running, then forks a clean child that executes the program and serves calls.

Every process has rlimits on CPU time, address space, file size, open files and processes; the program
process has no stdin, a private working directory and its stdout / stderr on pipes the harness reads
up to a cap.
"""

import builtins
import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

MAX_FRAME = 8 << 20  # bytes of one message between harness and program
MAX_DEPTH = 64  # nesting of plain values
_HDR = struct.Struct(">I")
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 38, 4, 36
MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 32, 4096, 16384, 1 << 18
MS_RDONLY = 1
BUILTIN_EXCEPTIONS = {k: v for k, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception)}


# ---------------------------------------------------------------------------------------------
# plain values across the process boundary


def encode(x, depth=0):
    """A JSON-able form of a plain value; anything else raises TypeError."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is str or t is float:
        return x
    if t is list or t is tuple or t is set or t is frozenset:
        return {"t": t.__name__, "v": [encode(e, depth + 1) for e in x]}
    if t is dict:
        return {"t": "dict", "v": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"t": "bytes", "v": x.hex()}
    if t is complex:
        return {"t": "complex", "v": [x.real, x.imag]}
    raise TypeError(f"a value of type {t.__name__} cannot cross the sandbox boundary (plain data only)")


_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode(x, depth=0):
    """Inverse of ``encode``; builds only plain values, whatever the input."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if isinstance(x, list):
        raise ValueError("bare list in an encoded value")
    if not isinstance(x, dict):
        return x
    t, v = x.get("t"), x.get("v")
    if t in _CONTAINERS and isinstance(v, list):
        return _CONTAINERS[t](decode(e, depth + 1) for e in v)
    if t == "dict" and isinstance(v, list):
        return {decode(k, depth + 1): decode(val, depth + 1) for k, val in v}
    if t == "bytes" and isinstance(v, str):
        return bytes.fromhex(v)
    if t == "complex" and isinstance(v, list) and len(v) == 2:
        return complex(float(v[0]), float(v[1]))
    raise ValueError(f"unknown encoded value {t!r}")


def send_msg(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(_HDR.pack(len(data)) + data)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_msg(sock):
    """The next message, or None at end of stream. Oversized or malformed frames raise ValueError."""
    head = _recv_exact(sock, _HDR.size)
    if head is None:
        return None
    (n,) = _HDR.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"message of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exact(sock, n)
    if body is None:
        return None
    return json.loads(body)


# ---------------------------------------------------------------------------------------------
# process hardening


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    try:
        return _libc().prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _mount(src, target, fstype, flags, data):
    libc = _libc()
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def private_filesystem(tmp_mb):
    """Private tmpfs on the world-writable dirs and a read-only view of everything else."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)


def set_limits(lim, cpu_s):
    pairs = [
        (resource.RLIMIT_CPU, int(cpu_s)),
        (resource.RLIMIT_AS, lim["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, lim["file_mb"] << 20),
        (resource.RLIMIT_NOFILE, lim["open_files"]),
        (resource.RLIMIT_NPROC, lim["processes"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in pairs:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def drop_to(uid):
    """Become ``uid`` (group ``uid``, no supplementary groups, no new privileges)."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _close_fds_except(keep):
    keep = sorted(set(keep) | {0, 1, 2})
    lo = 0
    for fd in keep + [65536]:
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1


# ---------------------------------------------------------------------------------------------
# the program process


def serve_program(sock, program):
    """Execute ``program`` and answer calls to its top-level names until the harness hangs up."""
    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - any failure to load is reported, never raised
        _flush()
        send_msg(sock, {"ok": False, "error": _describe(e)})
        os._exit(1)
    names = {}
    for key, value in list(ns.items()):
        if key.startswith("__"):
            continue
        if callable(value):
            names[key] = {"fn": True}
        else:
            try:
                names[key] = {"value": encode(value)}
            except (TypeError, ValueError, RecursionError):
                pass
    _flush()
    send_msg(sock, {"ok": True, "names": names})
    while True:
        msg = recv_msg(sock)
        if msg is None:
            os._exit(0)
        try:
            fn = ns[msg["call"]]
            args = [decode(a) for a in msg["args"]]
            kwargs = {k: decode(v) for k, v in msg["kwargs"].items()}
            result = fn(*args, **kwargs)
            reply = {"ret": encode(result)}
        except BaseException as e:  # noqa: BLE001 - SystemExit too: it is the call's outcome
            reply = {"raise": [type(e).__name__, _describe(e, tb=False)]}
        _flush()
        send_msg(sock, reply)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a program may have replaced or closed its streams
            pass


def _describe(e, tb=True):
    if isinstance(e, SyntaxError):
        return "".join(traceback.format_exception_only(type(e), e))[-2000:]
    text = f"{type(e).__name__}: {e}"
    if tb:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<program>"]
        text = "".join(f"  line {f.lineno}, in {f.name}\n" for f in frames[-5:]) + text
    return text[-2000:]


# ---------------------------------------------------------------------------------------------
# the zygote


def zygote(ctrl, programs, cfg, harness_pid):
    """Fork one clean program process per request from the harness; clean up between them."""
    uid = cfg["uids"][1] if cfg["uids"] else None
    work = cfg["workdir"]
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o711)
    _prctl(PR_SET_DUMPABLE, 0)
    run_dir = os.path.join(work, "run")
    child = None
    while True:
        msg = recv_msg(ctrl)
        if child is not None:  # the usual case: only the program process itself is left; reap it now
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        _kill_leftovers(harness_pid, uid)
        _rmtree(run_dir)
        if msg is None:
            return
        os.mkdir(run_dir, 0o700)
        if uid is not None:
            os.chown(run_dir, uid, uid)
        mine, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.setpgid(0, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                _close_fds_except([theirs.fileno()])
                set_limits(cfg["limits"], cfg["limits"]["cpu_s"])
                drop_to(uid)
                os.chdir(run_dir)
                os.environ.clear()
                os.environ.update(cfg["env"], HOME=run_dir, TMPDIR=run_dir)
                serve_program(theirs, programs[msg["run"]])
            except BaseException:  # noqa: BLE001 - the harness sees stderr and a closed socket
                traceback.print_exc()
            finally:
                os._exit(1)
        for fd in (theirs.fileno(), out_w, err_w):
            os.close(fd)
        theirs.detach()
        socket.send_fds(ctrl, [b"k"], [mine.fileno(), out_r, err_r])
        mine.close()
        os.close(out_r)
        os.close(err_r)


def _rmtree(path):
    """Remove a program's directory, even where it took away its own permissions."""
    if not os.path.lexists(path):
        return
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(top, d), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _kill_leftovers(harness_pid, prog_uid):
    """Kill the last program and everything it started: every descendant of this process (orphans
    are reparented here, a subreaper) and every process of the program's uid, then reap them."""
    for _ in range(2000):
        procs = _processes()
        pids = [p for p in _descendants(os.getpid(), procs) if p != harness_pid]
        if prog_uid is not None:
            pids += [p for p, (_, uid) in procs.items() if uid == prog_uid and p not in pids]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.0005)


def _processes():
    """{pid: (parent pid, real uid)} of every visible process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", "rb") as f:
                    fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
                out[int(entry)] = (int(fields[b"PPid"]), int(fields[b"Uid"].split()[0]))
            except (OSError, KeyError, ValueError, IndexError):
                pass
    return out


def _descendants(root, procs=None):
    """Pids whose parent chain leads to ``root``, nearest first."""
    procs = _processes() if procs is None else procs
    out, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier and pid not in out}
        out.extend(sorted(frontier))
    return out


# ---------------------------------------------------------------------------------------------
# the harness


class ItemTimeout(BaseException):
    """The item's time ran out (BaseException so test code's ``except Exception`` cannot eat it)."""


class ProgramGone(BaseException):
    """The program process died or broke the protocol."""


class Channel:
    """The harness's side of one program process: calls over the socket, output drained to a cap."""

    def __init__(self, fds, deadline, cap):
        self.sock = socket.socket(fileno=fds[0])
        self.sock.setblocking(False)
        self.deadline, self.cap = deadline, cap
        self.out = {fds[1]: bytearray(), fds[2]: bytearray()}
        self.truncated = {fds[1]: False, fds[2]: False}
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        for fd in (fds[1], fds[2]):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)
        self.inbox = bytearray()

    def _pump(self, want_msg):
        while True:
            if want_msg and len(self.inbox) >= _HDR.size:
                (n,) = _HDR.unpack_from(self.inbox)
                if n > MAX_FRAME:
                    raise ProgramGone(f"program sent a {n}-byte message (limit {MAX_FRAME})")
                if len(self.inbox) >= _HDR.size + n:
                    body = bytes(self.inbox[_HDR.size:_HDR.size + n])
                    del self.inbox[:_HDR.size + n]
                    return json.loads(body)
            if want_msg:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise ItemTimeout()
                events = self.sel.select(min(left, 1.0))
            else:
                events = self.sel.select(0)
                if not events:
                    return None
            for key, _ in events:
                if key.fileobj is self.sock:
                    try:
                        chunk = self.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise ProgramGone("the program process exited")
                    self.inbox += chunk
                else:
                    self._read_output(key.fd)

    def _read_output(self, fd):
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        buf = self.out[fd]
        if not chunk or len(buf) + len(chunk) > self.cap:
            buf += chunk[: max(0, self.cap - len(buf))]
            if chunk:
                self.truncated[fd] = True
            self.sel.unregister(fd)
            os.close(fd)  # a flooding program now gets EPIPE / SIGPIPE
            return
        buf += chunk

    def request(self, msg):
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
            send_msg(self.sock, msg)
        except TimeoutError:
            raise ItemTimeout() from None
        except OSError as e:
            raise ProgramGone(f"the program process is gone ({e.strerror})") from None
        finally:
            self.sock.setblocking(False)
        return self.receive()

    def receive(self):
        try:
            return self._pump(want_msg=True)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProgramGone(f"malformed reply from the program ({e})") from None

    def texts(self):
        self.sel.unregister(self.sock)
        self._pump(want_msg=False)
        out = []
        for fd in list(self.out):
            text = self.out[fd].decode("utf-8", "replace")
            out.append(text + ("\n[... output truncated]" if self.truncated[fd] else ""))
        return out

    def close(self):
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
            if key.fileobj is not self.sock:
                os.close(key.fd)
        self.sel.close()
        self.sock.close()


def _proxy(channel, name):
    def call(*args, **kwargs):
        try:
            msg = {"call": name, "args": [encode(a) for a in args], "kwargs": {k: encode(v) for k, v in kwargs.items()}}
        except TypeError as e:
            raise TypeError(f"cannot pass this argument to the sandboxed {name}(): {e}") from None
        reply = channel.request(msg)
        if "ret" in reply:
            try:
                return decode(reply["ret"])
            except (ValueError, TypeError, RecursionError) as e:
                raise ProgramGone(f"undecodable value from {name}(): {e}") from None
        if "raise" in reply:
            kind, text = (list(reply["raise"]) + ["", ""])[:2]
            exc = BUILTIN_EXCEPTIONS.get(str(kind), RuntimeError)
            raise exc(str(text)[:2000])
        raise ProgramGone("the program broke the call protocol")

    call.__name__ = name
    return call


def _message(msg):
    try:
        return str(msg())[:500]
    except (ItemTimeout, ProgramGone):
        raise
    except Exception as e:  # noqa: BLE001
        return f"<message raised {type(e).__name__}>"


def run_item(channel, item):
    """Run one item's tests against the program behind ``channel``; return the verdict fields."""
    ready = channel.receive()
    total = item["sites"]
    if not isinstance(ready, dict) or not ready.get("ok"):
        error = ready.get("error", "program failed to load") if isinstance(ready, dict) else "bad handshake"
        return {"status": "error", "passed": 0, "total": total, "error": str(error)[-2000:]}
    names = ready.get("names")
    if not isinstance(names, dict):
        raise ProgramGone("bad handshake")
    ok_sites, bad_sites, notes = set(), set(), []

    def check_site(i, cond, msg=None):
        try:
            good = bool(cond())
        except (ItemTimeout, ProgramGone):
            raise
        except Exception as e:  # noqa: BLE001 - a raising assertion is a failed test, and tests go on
            good = False
            if len(notes) < 5:
                notes.append(f"assertion {i}: {type(e).__name__}: {e}"[:500])
        if not good:
            bad_sites.add(i)
            if len(notes) < 5:
                notes.append(f"assertion {i} failed" + (f": {_message(msg)}" if msg is not None else ""))
        else:
            ok_sites.add(i)

    env = {"__name__": "__test__", "__builtins__": builtins}
    for name, spec in names.items():
        if not isinstance(spec, dict) or not isinstance(name, str):
            continue
        if spec.get("fn"):
            env[name] = _proxy(channel, name)
        elif "value" in spec:
            try:
                env[name] = decode(spec["value"])
            except (ValueError, TypeError, RecursionError) as e:
                raise ProgramGone(f"undecodable global {name!r}: {e}") from None
    env["__ol_assert__"] = check_site
    entry = item.get("entry_point")
    error = ""
    try:
        if entry and entry not in names:
            return {"status": "error", "passed": 0, "total": total,
                    "error": f"the program does not define {entry}()"}
        exec(compile(item["test"], "<test>", "exec"), env)
        if entry and callable(env.get("check")):
            env["check"](env[entry] if entry in env else _proxy(channel, entry))
        clean = True
    except ItemTimeout:
        raise
    except ProgramGone as e:
        clean, error = False, str(e)
    except Exception as e:  # noqa: BLE001 - an exception in test code outside an assert fails the item
        clean, error = False, _describe(e, tb=False)
    passed = len(ok_sites - bad_sites)
    all_ran = len(ok_sites | bad_sites) == total
    status = "passed" if clean and all_ran and not bad_sites else "failed"
    if clean and not all_ran and not bad_sites:
        error = f"only {len(ok_sites)} of {total} assertions ran"
    return {"status": status, "passed": passed, "total": total, "error": (error or "; ".join(notes))[-2000:]}


def harness(ctrl, tests, report, cfg):
    uid = cfg["uids"][0] if cfg["uids"] else None
    os.chdir("/")
    drop_to(uid)
    _prctl(PR_SET_DUMPABLE, 0)
    timeout, cap = cfg["timeout_s"], cfg["output_cap"]
    out = os.fdopen(report, "w", buffering=1)
    for i, item in enumerate(tests["items"]):
        start = time.monotonic()
        send_msg(ctrl, {"run": i})
        _, fds, _, _ = socket.recv_fds(ctrl, 16, 3)
        if len(fds) != 3:
            raise RuntimeError("the zygote stopped answering")
        channel = Channel(fds, start + timeout, cap)
        try:
            verdict = run_item(channel, item)
        except ItemTimeout:
            verdict = {"status": "timeout", "passed": 0, "total": item["sites"],
                       "error": f"time limit of {timeout:g} s exceeded"}
        except ProgramGone as e:
            verdict = {"status": "failed", "passed": 0, "total": item["sites"], "error": str(e)}
        try:
            stdout, stderr = channel.texts()
        finally:
            channel.close()
        verdict.update(i=i, nonce=tests["nonce"], stdout=stdout, stderr=stderr,
                       seconds=round(time.monotonic() - start, 4))
        out.write(json.dumps(verdict) + "\n")
    out.write(json.dumps({"done": True, "nonce": tests["nonce"], "layers": cfg.get("layers", {})}) + "\n")
    out.close()


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def main(cfg):
    fds = cfg["fds"]
    layers = {}
    if cfg["private_fs"]:
        try:
            private_filesystem(cfg["limits"]["tmp_mb"])
            layers["private_fs"] = True
        except OSError as e:
            layers["private_fs"] = False
            layers["private_fs_error"] = str(e)
    cfg["layers"] = layers
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    set_limits(cfg["limits"], cfg["limits"]["cpu_s"] * cfg["n_items"] + 10)
    ctrl_h, ctrl_z = socket.socketpair()
    harness_pid = os.fork()
    if harness_pid == 0:
        try:
            os.close(fds["programs"])
            ctrl_z.close()
            tests = _read_all(fds["tests"])
            harness(ctrl_h, tests, fds["report"], cfg)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            os._exit(3)
    os.close(fds["tests"])
    os.close(fds["report"])
    ctrl_h.close()
    programs = _read_all(fds["programs"])
    try:
        zygote(ctrl_z, programs, cfg, harness_pid)
        os.waitpid(harness_pid, 0)
    finally:
        os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main(json.loads(sys.argv[1]))
