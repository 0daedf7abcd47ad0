"""CPU matmul kernels for the lean paths, chosen per shape by timing both on the running machine.

The lean paths can run a float32 linear through oneDNN (``torch.ops.mkldnn._linear_pointwise``) or
through torch's default CPU GEMM (``F.linear``). Which is faster depends on the machine: two machines
that both report "AMD EPYC, 2 cores" disagreed on it. So at the first use of a shape the two are timed
on that shape (a few repetitions each, best time), and the faster is kept; oneDNN must win by
``MARGIN`` to replace torch's own kernel, so near-ties stay with the default.

A choice changes the floating-point summation order, so for runs to stay bitwise reproducible on one
machine the choices are also stored in the onelayer cache, keyed by host, CPU model, torch version and
thread count (``$ONELAYER_CACHE/kernels/``); a later process on the same machine reuses them instead of
timing again. ``ONELAYER_CPU_LINEAR=default|onednn`` forces one kernel everywhere (tests, debugging).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import torch
import torch.nn.functional as F

KERNELS = ("default", "onednn")
MARGIN = 0.05  # oneDNN replaces the default kernel only when at least this much faster
ENV = "ONELAYER_CPU_LINEAR"
_LOG = logging.getLogger("onelayer.kernels")
_CHOICES: dict[tuple, str] = {}  # (m, k, n), or (m, k, n, "t") for a weight gradient's transposed operands
_TIMES: dict[tuple, dict[str, float]] = {}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _bucket(m: int) -> int:
    """A token count rounded up to a power of two: decode batches shrink as rows finish and every training
    batch holds a different number of tokens, so one choice serves a band of sizes (and the store stays
    small) instead of one measurement per size."""
    return 1 << max(0, int(m - 1).bit_length())


def _store_path():
    from onelayer.io import cache_root

    key = f"{socket.gethostname()}|{cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in key)[:160]
    return cache_root() / "kernels" / f"{safe}.json"


def _load_stored() -> dict:
    path = _store_path()
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def stored(name: str) -> dict | None:
    """A choice measured earlier on this machine (same host, CPU, torch and threads), by its name."""
    return _load_stored().get(name)


def _store(key: tuple | str, choice: str, times: dict) -> None:
    from onelayer.io import atomic_write_json, file_lock

    path = _store_path()
    try:
        with file_lock(path.with_suffix(".lock")):
            data = _load_stored()
            data.setdefault("_machine", {"host": socket.gethostname(), "cpu": cpu_model(),
                                         "torch": torch.__version__, "threads": torch.get_num_threads()})
            name = key if isinstance(key, str) else "x".join(map(str, key))
            data[name] = {"choice": choice, **{k: round(v, 9) for k, v in times.items()}}
            atomic_write_json(path, data)
    except OSError:  # a read-only cache only costs the reuse across processes
        pass


def store(name: str, choice: str, times: dict) -> None:
    """Keep a measured choice for later processes on this machine (`stored` reads it back)."""
    _store(name, choice, times)


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(m: int, k: int, n: int, transposed: bool = False) -> dict[str, float]:
    """Best-of-a-few seconds of an [m, k] x [n, k]^T float32 linear with each kernel (inference mode).
    `transposed`: both operands are transposed views, as a weight gradient dY^T X is called (oneDNN then
    copies them first, the default GEMM reads them as they are, and the copy counts)."""
    x, w = (torch.randn(k, m).t(), torch.randn(k, n).t()) if transposed else (torch.randn(m, k), torch.randn(n, k))
    reps = max(3, min(30, int(2e8 / max(1, 2 * m * k * n))))  # ~0.1-0.2 s per shape whatever its size
    with torch.inference_mode():
        return {"default": _time(lambda: F.linear(x, w), reps), "onednn": _time(lambda: onednn_linear(x, w, None), reps)}


def choose(m: int, k: int, n: int, tokens: str = "m") -> str:
    """The kernel for an [m, k] x [n, k]^T float32 linear on this machine: 'default' or 'onednn'.

    `tokens` names the dimension that counts tokens ("m", or "k" for a weight gradient dY^T X, whose inner
    dimension is the batch's tokens, and both operands are transposed views); that one is bucketed (`_bucket`)
    and measured at its band's size."""
    forced = os.environ.get(ENV, "auto").lower()
    if forced in KERNELS:
        return forced if (forced == "default" or _ONEDNN) else "default"
    if not _ONEDNN:
        return "default"
    key = (_bucket(m), k, n) if tokens == "m" else (m, _bucket(k), n, "t")
    if key in _CHOICES:
        return _CHOICES[key]
    stored = _load_stored().get("x".join(map(str, key)))
    if stored is not None and stored.get("choice") in KERNELS:
        _CHOICES[key] = stored["choice"]
        _TIMES[key] = {k_: v for k_, v in stored.items() if k_ in KERNELS}
        return _CHOICES[key]
    times = measure(*key[:3], transposed=tokens != "m")
    choice = "onednn" if times["onednn"] < times["default"] * (1 - MARGIN) else "default"
    _CHOICES[key], _TIMES[key] = choice, times
    _store(key, choice, times)
    _LOG.info("linear %s: default %.3g ms, onednn %.3g ms -> %s", "x".join(map(str, key)),
              times["default"] * 1e3, times["onednn"] * 1e3, choice)
    return choice


def choices() -> dict[str, dict]:
    """Every choice this process made or reused: {"MxKxN": {"choice", "default", "onednn" (seconds)}}."""
    return {"x".join(map(str, k)): {"choice": c, **_TIMES.get(k, {})} for k, c in sorted(_CHOICES.items())}


def summary() -> str:
    """One line: how many shapes went to each kernel."""
    made = list(_CHOICES.values())
    forced = os.environ.get(ENV, "auto").lower()
    if forced in KERNELS:
        return f"forced {forced} ({ENV})"
    if not _ONEDNN:
        return "default (oneDNN unavailable)"
    return f"{made.count('onednn')} shapes onednn, {made.count('default')} default (measured on {cpu_model()})"
