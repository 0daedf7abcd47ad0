"""CPU matmul kernels for the lean paths, chosen per shape by timing them on the running machine.

The lean paths can run a float32 linear through torch's default CPU GEMM (``F.linear``), through oneDNN
(``torch.ops.mkldnn._linear_pointwise``), or "split": the output's columns divided over the intra-op
threads, each part one single-threaded GEMM call (`split_linear` in the compiled module, `policy.fused`;
with two or more threads). Which is fastest depends on the machine and the shape: two machines that both
report "AMD EPYC, 2 cores" disagreed on oneDNN against the default, and on one of them the default GEMM ran
a 64-row decode matmul no faster on two threads than on one, where the split ran it 1.1-1.3x faster. So
at the first use of a shape each available kernel is timed on that shape (a few repetitions each, best
time), and the fastest is kept; another kernel must beat torch's own by ``MARGIN`` to replace it, so
near-ties stay with the default.

A choice changes the floating-point summation order, so for runs to stay bitwise reproducible on one
machine the choices are also stored in the onelayer cache, keyed by host, CPU model, torch version and
thread count (``$ONELAYER_CACHE/kernels/``); a later process on the same machine reuses them instead of
timing again. ``ONELAYER_CPU_LINEAR=default|onednn|split`` forces one kernel everywhere (tests,
debugging; a kernel unavailable here falls back to the default); the compiled decode step's own GEMM on
packed weights (`policy.fused`) is then not used either.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import torch
import torch.nn.functional as F

KERNELS = ("default", "onednn", "split")  # the compiled decode step numbers them in this order
MARGIN = 0.05  # another kernel replaces the default only when at least this much faster
STORE_VERSION = 2  # bump when the candidates change, so stored choices are measured again
ENV = "ONELAYER_CPU_LINEAR"
_LOG = logging.getLogger("onelayer.kernels")
# (threads, m, k, n), or (threads, m, k, n, "t") for a weight gradient's transposed operands: a choice holds for
# the thread count it was measured at (the split kernel runs only on 2+)
_CHOICES: dict[tuple, str] = {}
_TIMES: dict[tuple, dict[str, float]] = {}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _split_module():
    """The compiled module when the split kernel can run here (2+ threads, the module built), else None."""
    if torch.get_num_threads() < 2:
        return None
    from onelayer.policy import fused

    module = fused.extension()
    return module if module is not None and hasattr(module, "split_linear") else None


def split_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, add: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x W^T (+ b) (+ add) with W's rows (the output's columns) split over the intra-op threads."""
    empty = x.new_empty(0)
    return _split_module().split_linear(x, w, empty if b is None else b, empty if add is None else add)


def available() -> tuple[str, ...]:
    """The kernels that can run here."""
    return tuple(k for k in KERNELS if k == "default" or (k == "onednn" and _ONEDNN)
                 or (k == "split" and _split_module() is not None))


def run(kernel: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)` on `kernel` (no autograd of its own: `ops.linear` wraps it for training)."""
    if kernel == "onednn":
        return onednn_linear(x, w, b)
    if kernel == "split":
        return split_linear(x, w, b)
    return F.linear(x, w, b)


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

    key = (f"v{STORE_VERSION}|{socket.gethostname()}|{cpu_model()}|torch {torch.__version__}"
           f"|threads {torch.get_num_threads()}")
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


def time_each(fns: dict, reps: int) -> dict[str, float]:
    """Best-of-`reps` seconds of each of `fns` (name -> callable), after one untimed call each, timed in
    interleaved rounds whose order rotates, so that a drift of the machine's speed while they are measured
    (tens of percent over seconds on these machines) hits them all alike."""
    names = list(fns)
    for name in names:
        fns[name]()
    best = dict.fromkeys(names, float("inf"))
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(m: int, k: int, n: int, transposed: bool = False) -> dict[str, float]:
    """Best-of-a-few seconds of an [m, k] x [n, k]^T float32 linear with each kernel available here
    (inference mode). `transposed`: both operands are transposed views, as a weight gradient dY^T X is
    called (oneDNN then copies them first, the default GEMM reads them as they are, and the copy counts;
    the split kernel is not offered there)."""
    x, w = (torch.randn(k, m).t(), torch.randn(k, n).t()) if transposed else (torch.randn(m, k), torch.randn(n, k))
    reps = max(3, min(30, int(2e8 / max(1, 2 * m * k * n))))  # ~0.1-0.2 s per shape whatever its size
    with torch.inference_mode():
        return time_each({kernel: lambda kernel=kernel: run(kernel, x, w) for kernel in available()
                          if not (transposed and kernel == "split")}, reps)


def forced() -> str | None:
    """The kernel ``ONELAYER_CPU_LINEAR`` forces everywhere, or None (the decode's packed GEMM is then not used)."""
    value = os.environ.get(ENV, "auto").lower()
    return value if value in KERNELS else None


def choose(m: int, k: int, n: int, tokens: str = "m") -> str:
    """The kernel for an [m, k] x [n, k]^T float32 linear on this machine: one of `KERNELS`.

    `tokens` names the dimension that counts tokens ("m", or "k" for a weight gradient dY^T X, whose inner
    dimension is the batch's tokens, and both operands are transposed views); that one is bucketed (`_bucket`)
    and measured at its band's size."""
    force = forced()
    if force is not None:  # where the forced kernel cannot run (split: only where the tokens are rows), the default
        usable = (force == "default" or (force == "onednn" and _ONEDNN)
                  or (force == "split" and tokens == "m" and _split_module() is not None))
        return force if usable else "default"
    key = (_bucket(m), k, n) if tokens == "m" else (m, _bucket(k), n, "t")
    mem = (torch.get_num_threads(), *key)
    if mem in _CHOICES:  # first: this runs on every linear call
        return _CHOICES[mem]
    if len(available()) == 1:
        return "default"
    stored = _load_stored().get("x".join(map(str, key)))
    if stored is not None and stored.get("choice") in available():
        _CHOICES[mem] = stored["choice"]
        _TIMES[mem] = {k_: v for k_, v in stored.items() if k_ in KERNELS}
        return _CHOICES[mem]
    times = measure(*key[:3], transposed=tokens != "m")
    choice = _fastest(times)
    _CHOICES[mem], _TIMES[mem] = choice, times
    _store(key, choice, times)
    _LOG.info("linear %s: %s -> %s", "x".join(map(str, key)),
              ", ".join(f"{k_} {t * 1e3:.3g} ms" for k_, t in times.items()), choice)
    return choice


def _fastest(times: dict[str, float]) -> str:
    """The fastest kernel, where it beats the default by `MARGIN`; otherwise the default."""
    best = min((k for k in times if k != "default"), key=times.get, default="default")
    return best if best != "default" and times[best] < times["default"] * (1 - MARGIN) else "default"


def choices() -> dict[str, dict]:
    """Every choice this process made or reused at its current thread count: {"MxKxN": {"choice", and each
    kernel's seconds}}."""
    threads = torch.get_num_threads()
    return {"x".join(map(str, k[1:])): {"choice": c, **_TIMES.get(k, {})} for k, c in sorted(_CHOICES.items())
            if k[0] == threads}


def summary() -> str:
    """One line: how many shapes went to each kernel."""
    made = [c["choice"] for c in choices().values()]
    force = forced()
    if force is not None:
        return f"forced {force} ({ENV})"
    if len(available()) == 1:
        return "default (no other kernel available here)"
    counts = ", ".join(f"{made.count(k)} {k}" for k in available())
    return f"shapes per kernel: {counts} (measured on {cpu_model()})"
