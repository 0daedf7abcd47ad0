"""Keep freed CPU memory inside the process, so that each RL step does not page-fault its activations in again.

A training step allocates and frees the same large activation and gradient buffers every step. glibc's
allocator hands blocks above its mmap threshold straight back to the OS when they are freed, and trims the
top of its heap when enough of it is free; the next step then gets fresh pages, and the kernel zero-fills
every one of them on first touch (a minor page fault each). On a small model that is a large share of the
update. `retain_freed_memory` raises both thresholds (`mallopt`), so freed blocks stay in the heap and
are reused: the arithmetic is unchanged (the same kernels on the same values, bit for bit); the process
keeps its peak memory instead of returning it between steps. Blocks above glibc's largest mmap threshold
(32 MiB on 64-bit) are still mapped per allocation.

`cpu_allocator: system` (config) leaves the allocator as it is. Other C libraries (musl, macOS) are left
alone, with the reason recorded. `minor_faults` reads the process's count of minor page faults, which the
trainer logs per step (`page_faults` in metrics.jsonl) so the effect can be checked on any machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource

CHOICES = ("retain", "system")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept before trimming
_STATE: dict[str, str] = {}


def retain_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once). Returns what was done, in words."""
    if "note" in _STATE:
        return _STATE["note"]
    libc_name, version = platform.libc_ver()
    if libc_name != "glibc":
        note = f"system allocator (not glibc: {libc_name or platform.system()})"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        except (OSError, AttributeError) as err:
            ok, version = False, f"{version}: {err}"
        note = (f"glibc {version}, freed blocks kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                f"{TRIM_THRESHOLD >> 20} MiB)") if ok else f"system allocator (mallopt failed, glibc {version})"
    _STATE["note"] = note
    return note


def configure(choice: str) -> str:
    """Apply the `cpu_allocator` setting (`retain` or `system`); returns `note()`. A process that already
    retained keeps doing so (glibc's dynamic thresholds cannot be restored)."""
    if choice == "retain":
        retain_freed_memory()
    return note()


def note() -> str:
    """What this process's allocator does, in words (run records keep it as `cpu_allocator`)."""
    return _STATE.get("note", "system allocator")


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh pages, among others)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
