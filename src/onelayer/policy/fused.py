"""The lean decoder's one-token step compiled into one call (`fused_decode.cpp`), used where it measures faster,
and the build of the compiled module it shares with the training forward's kernels (`fused_train.cpp`,
used by `policy.fused_ops`).

On a CPU a small model's decode step is mostly per-op cost: ~300 small torch ops a step, ~1 ms of Python
and dispatch whatever the batch. `decode_step` runs every block's norms, rotary, KV-cache write and
attention as loops in one C++ call, and the matmuls on the kernels `policy.kernels` chose per shape. The
module is built at first use with torch's C++ extension loader (a C++ compiler and ninja) for the running
CPU's instruction set (``-march=native``) into ``$ONELAYER_CACHE/ext/``, once per CPU (model and flags),
torch version and source.

The compiled step comes in two variants: "fused", its matmuls on the kernels chosen per shape, and
"packed", its block matmuls on the module's own GEMM over weights packed once per rollout (`pack_weight`;
a frozen block's packing is kept with its gathered weights). A decoder uses one only when it built, when
its logits and new KV-cache entries matched the Python step's (to 1e-5 relative) on the first step it served
in this process, and when it measured faster than the Python step on that step's shapes (packed against
fused too, with the packing of the blocks that every rollout packs again, the trainable ones, spread over
the rollout's remaining steps; so the choice is per number of such blocks). The timing is kept with the
matmul choices (`kernels.store`), so later processes on the machine reuse it and stay reproducible.
``ONELAYER_FUSED_DECODE=off`` turns it off, ``on`` and ``packed`` skip the timing and use that variant
(still checked); `choices()` says what each process decided and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from onelayer.policy import kernels

ENV = "ONELAYER_FUSED_DECODE"
MARGIN = 0.05  # the compiled step replaces the Python one only when at least this much faster
TOL = 1e-5
REPS = 7  # timed rounds per variant (interleaved, best of)
# -fopenmp: ATen's parallel_for is inline OpenMP, serial without it. -fno-math-errno -fno-trapping-math (torch's
# own flags): loops with floor or a select vectorise; no reassociation, so every sum keeps its order
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
SOURCES = tuple(Path(__file__).with_name(f) for f in ("fused_decode.cpp", "fused_train.cpp"))
FUNCTIONS = ["decode_step", "split_linear", "pack_weight", "packed_linear", "packed_width", "rms_fwd", "rms_bwd", "qkv_fwd",
             "qkv_bwd", "swiglu_fwd", "swiglu_bwd", "attn_fwd", "attn_bwd"]
_LOG = logging.getLogger("onelayer.fused")
_EXT: dict[str, object] = {}  # "module" or "reason"
_DECIDED: dict[str, dict] = {}  # per decoder shape: {"choice", "python", "fused", "packed" (s), "reason"}


PACKED = 3  # the compiled step's index for its own GEMM on packed weights (after `kernels.KERNELS`' three)


def mode() -> str:
    value = os.environ.get(ENV, "auto").lower()
    return value if value in ("auto", "on", "off", "packed") else "auto"


def extension():
    """The compiled module, built or loaded once per process; None when it cannot be (`build_note` says why)."""
    if "module" in _EXT or "reason" in _EXT:
        return _EXT.get("module")
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        from onelayer.io import cache_root

        source = "\n".join(path.read_text() for path in SOURCES)
        key = f"{source}|{CFLAGS}|{torch.__version__}|{kernels.cpu_model()}|{_cpu_flags()}"
        digest = _EXT["digest"] = hashlib.sha256(key.encode()).hexdigest()[:12]
        name, build = f"onelayer_fused_{digest}", cache_root() / "ext" / f"fused_decode-{digest}"
        if (build / f"{name}.so").is_file():  # built before on this machine: import it, no build step
            from torch.utils.cpp_extension import _import_module_from_library

            _EXT["module"] = _import_module_from_library(name, str(build), True)
        else:
            build.mkdir(parents=True, exist_ok=True)
            _EXT["module"] = load_inline(name, cpp_sources=[source], functions=FUNCTIONS,
                                         extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                         build_directory=str(build), verbose=False)
        _EXT["note"] = f"loaded in {time.perf_counter() - started:.1f} s from {build}"
    except Exception as err:  # no compiler, no ninja, a read-only cache: the Python step serves
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        _EXT["reason"] = f"not built ({type(err).__name__}: {first})"
        _LOG.info("fused decode step %s", _EXT["reason"])
    return _EXT.get("module")


def _cpu_flags() -> str:
    """The CPU's feature flags (two CPUs with one model name can differ, e.g. in AVX-512): a build is per flag set."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("flags")), "")
    except OSError:
        return ""


def build_id() -> str:
    """The compiled module's digest (source, flags, torch, CPU): stored timings of one build do not speak for another."""
    return str(_EXT.get("digest", "none"))


def build_note() -> str:
    return str(_EXT.get("note") or _EXT.get("reason") or "not needed yet")


def supports(dec) -> bool:
    """Decoders the compiled step reproduces: the CPU fold layout in float32, with no sliding-window."""
    return dec.fold and dec.device.type == "cpu" and dec.dtype == torch.float32 and dec.head_dim <= 1024


class FusedStep:
    """The compiled step for one `LeanDecoder` (its gathered weights as the C++ call takes them)."""

    def __init__(self, dec, module):
        empty = torch.empty(0)

        def bias(b):
            return empty if b is None else (b[0] if isinstance(b, list) else b)

        L = dec.layers
        self.dec, self.module, self.empty = dec, module, empty
        self.qkv_w, self.qkv_b = [lay["qkv"]["w"][0] for lay in L], [bias(lay["qkv"]["b"]) for lay in L]
        self.qkn = [lay["qk_norm"][0].contiguous() if lay["qk_norm"] is not None else empty for lay in L]
        self.o_w, self.o_b = [lay["o"][0] for lay in L], [bias(lay["o"][1]) for lay in L]
        self.gu_w, self.gu_b = [lay["gate_up"]["w"][0] for lay in L], [bias(lay["gate_up"]["b"]) for lay in L]
        self.d_w, self.d_b = [lay["down"][0] for lay in L], [bias(lay["down"][1]) for lay in L]
        self.head_w, self.head_b = dec.head["w"][0], bias(dec.head["b"])
        self.eps = L[0]["qkv"]["eps"]
        self.qeps = L[0]["qk_norm"][1] if L[0]["qk_norm"] is not None else 1e-6
        self._flags: dict[int, list[int]] = {}  # per batch size: the matmuls' kernels
        self._serves: dict[int, str] = {}  # per batch-size band: the variant that serves (`decide`)
        self._packed: list[list[torch.Tensor]] | None = None  # qkv, o, gate/up, down weights packed (`packed`)
        self.pack_s = 0.0  # seconds this decoder spent packing weights that every rollout packs again
        H = self.qkv_w[0].shape[1]
        # with how many blocks each rollout packs again: packed's cost per step, so its choice, depends on it
        self.shape = (f"H{H}-I{self.d_w[0].shape[1]}-h{dec.heads}-kv{dec.kv_heads}-d{dec.head_dim}-L{len(L)}"
                      f"-V{self.head_w.shape[0]}{'-qkn' if L[0]['qk_norm'] is not None else ''}-fresh{sum(dec.fresh)}")

    def _kernels(self, B: int) -> list[int]:
        """Which kernel (its index in `kernels.KERNELS`) each of the qkv, o, gate/up, down and head matmuls
        runs on at B rows (the Python step's choices), worked out once per batch size."""
        if B not in self._flags:
            from onelayer.policy.ops import _kernel

            x, inner = torch.empty(B, self.qkv_w[0].shape[1]), torch.empty(B, self.d_w[0].shape[1])
            att = torch.empty(B, self.o_w[0].shape[1])
            self._flags[B] = [kernels.KERNELS.index(_kernel(a, w)) for a, w in
                              ((x, self.qkv_w[0]), (att, self.o_w[0]), (x, self.gu_w[0]), (inner, self.d_w[0]),
                               (x, self.head_w))]
        return self._flags[B]

    def packed(self) -> list[list[torch.Tensor]]:
        """The block weights packed for the module's GEMM (`pack_weight`), built at first use. A frozen block's
        packing is kept in its gathered weights, which `LeanDecoder` keeps across rollouts (`decoder._kept`)."""
        if self._packed is None:
            lists = [[], [], [], []]
            for lay, fresh, weights in zip(self.dec.layers, self.dec.fresh, zip(self.qkv_w, self.o_w, self.gu_w, self.d_w)):
                if "packed" not in lay:
                    t0 = time.perf_counter()
                    lay["packed"] = [self.module.pack_weight(w) for w in weights]
                    if fresh:  # a frozen block's packing is kept for later rollouts: not a per-rollout cost
                        self.pack_s += time.perf_counter() - t0
                for out, w in zip(lists, lay["packed"]):
                    out.append(w)
            self._packed = lists
        return self._packed

    def serves(self, python, ids, positions, start, mask, rows) -> bool:
        """Whether a compiled variant serves a one-token step of `ids`' batch size (`decide`, once per band)."""
        band = kernels._bucket(ids.shape[0])
        if band not in self._serves:
            self._serves[band] = decide(self, python, ids, positions, start, mask, rows)
            if "packed" not in self._serves.values():  # packed only for the check: not kept with the weights
                for lay in self.dec.layers:
                    lay.pop("packed", None)
                self._packed = None
        return self._serves[band] != "python"

    def __call__(self, ids, positions, start, mask, rows, variant: str | None = None):
        """One step on the compiled module; `variant` "fused" or "packed" (None: the one `decide` chose)."""
        dec, B = self.dec, ids.shape[0]
        variant = variant or self._serves.get(kernels._bucket(B), "fused")
        x = dec.embed(ids)[:, 0]
        rot = torch.view_as_real(dec.rot[positions[:, 0]])
        mask2d = self.empty if mask is None else mask[:, 0, 0]
        capture = -1 if dec.capture is None else dec.capture
        flags = self._kernels(B)
        qkv_w, o_w, gu_w, d_w = self.qkv_w, self.o_w, self.gu_w, self.d_w
        if variant == "packed":
            (qkv_w, o_w, gu_w, d_w), flags = self.packed(), [PACKED] * 4 + flags[4:]  # the head as chosen
        return self.module.decode_step(
            x, rot, qkv_w, self.qkv_b, self.qkn, o_w, self.o_b, gu_w, self.gu_b, d_w, self.d_b,
            dec.k, dec.v, self.head_w, self.head_b, start, mask2d, dec.heads, dec.kv_heads, dec.head_dim, self.eps,
            self.qeps, flags, capture, dec.captured if dec.captured is not None else self.empty,
            rows if rows is not None else torch.empty(0, dtype=torch.long)).float()


def for_decoder(dec) -> FusedStep | None:
    """The compiled step for `dec` when it may serve (built, not turned off, a layout it reproduces)."""
    if mode() == "off" or not supports(dec):
        return None
    module = extension()
    return None if module is None else FusedStep(dec, module)


def _entries(dec, B: int, start: int, rows) -> list[torch.Tensor]:
    """Copies of what one step writes: every block's new cache entries and the captured row, if any."""
    out = [t[:B, :, start].clone() for t in (*dec.k, *dec.v)]
    if dec.captured is not None:
        out.append(dec.captured[rows if rows is not None else slice(0, B), start].clone())
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger magnitude (0 when equal)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) if a.numel() else 0.0


def decide(step: FusedStep, python, ids, positions, start, mask, rows) -> str:
    """The variant ("python", "fused" or "packed") that serves this decoder's one-token steps at this batch
    size's band: each compiled one checked against the Python step `python` on this step's inputs, then all
    timed (or the stored timing reused); packed's time includes its packing, spread over the rollout's
    remaining steps. The caller then runs the step on the chosen variant (it rewrites the same cache slots)."""
    dec, B = step.dec, ids.shape[0]
    # a kernel forced everywhere (ONELAYER_CPU_LINEAR) leaves the packed GEMM out, and is kept apart in the store
    pinned = kernels.forced()
    variants = ("fused",) if pinned else ("fused", "packed")
    key = f"decode:{step.shape}-B{kernels._bucket(B)}-{build_id()}" + (f"-{pinned}" if pinned else "")
    if key not in _DECIDED:
        args = (ids, positions, start, mask, rows)
        want = python(*args)
        want_entries = _entries(dec, B, start, rows)
        errors = {}
        for variant in variants:
            got = step(*args, variant=variant)
            errors[variant] = max([_close(got, want)] + [_close(a, b) for a, b in zip(_entries(dec, B, start, rows),
                                                                                      want_entries)])
        ok = [v for v, err in errors.items() if err <= TOL]
        wanted = {"on": "fused", "packed": variants[-1]}.get(mode())  # a variant ONELAYER_FUSED_DECODE names
        if not ok or (wanted and wanted not in ok):
            bad = wanted or "fused"
            _DECIDED[key] = {"choice": "python", "reason": f"the compiled step ({bad}) differed by {errors[bad]:.1e} (relative)"}
        elif wanted:
            _DECIDED[key] = {"choice": wanted, "reason": f"{ENV}={mode()}"}
        elif (saved := kernels.stored(key)) is not None and saved.get("choice") in ("python", *ok):
            _DECIDED[key] = {**saved, "reason": "measured earlier on this machine"}
        else:
            times = kernels.time_each({"python": lambda: python(*args),
                                       **{v: lambda v=v: step(*args, variant=v) for v in ok}}, REPS)
            if "packed" in times:  # packing what every rollout packs again, spread over its remaining steps
                times["packed"] += step.pack_s / max(1, dec.k[0].shape[2] - start)
            choice = pick(times)
            kernels.store(key, choice, times)
            _DECIDED[key] = {"choice": choice, **times, "reason": "measured"}
            _LOG.info("decode step %s: %s -> %s", key, ", ".join(f"{k} {t * 1e3:.3g} ms" for k, t in times.items()),
                      choice)
    return _DECIDED[key]["choice"]


def pick(times: dict[str, float]) -> str:
    """The variant to serve from measured seconds a step: packed where it beats fused by `MARGIN` (else
    fused), and that one where it beats the Python step by `MARGIN` (else python)."""
    compiled = [v for v in ("fused", "packed") if v in times]
    if not compiled:
        return "python"
    best = "packed" if "packed" in times and times["packed"] < times.get("fused", float("inf")) * (1 - MARGIN) else compiled[0]
    return best if times[best] < times["python"] * (1 - MARGIN) else "python"


def choices() -> dict:
    """What this process decided per decoder shape, and how the compiled step was built (for run records)."""
    return {"build": build_note(), "mode": mode(), **{k: dict(v) for k, v in sorted(_DECIDED.items())}}
