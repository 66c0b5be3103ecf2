"""The host's TSC rate, told to TCG guests so their clock runs on the TSC.

Under TCG a guest's `rdtsc` reads the host's TSC (QEMU's cpu_get_host_ticks), but the
guest kernel cannot measure its rate: its PIT calibration fails under emulation, so it marks
the TSC unstable and keeps time with jiffies. Every clock in the guest then ticks in 4 ms
steps (CONFIG_HZ=250), no timer can be finer, and the boot spends time in the delay-loop
calibration. Given `tsc_early_khz=`, the kernel skips both calibrations, keeps time on the
TSC and runs high-resolution timers. KVM guests need none of this: they get kvm-clock.

The rate is measured against CLOCK_MONOTONIC_RAW, which on a TSC host is that same TSC
scaled by the host kernel's own calibration, so the guest inherits the host's accuracy.
Only a host with an invariant TSC (constant and nonstop) qualifies; elsewhere None, and the
guest falls back to jiffies as before.

The figure is measured once per host boot and kept in the cache (`tsc-khz.json`, with the
kernel's boot_id): every process then tells guests the same rate, and a warm-start template,
whose guest keeps the rate it booted with, is keyed by it (vmm/warm.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from isorun.vmm.accel import cpu_flags
from isorun.vmm.artifacts import cache_root

# rdtsc; shl rdx, 32; or rax, rdx; ret: the 64-bit counter in rax (System V ABI).
_RDTSC_CODE = bytes((0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3))
_WINDOW_S = 0.05  # long enough that a microsecond of bracketing error is 20 ppm
_SAMPLES = 9  # per end of the window: the tightest rdtsc bracket around the clock read wins
_SANE_KHZ = range(100_000, 10_000_001)  # 100 MHz .. 10 GHz


def _invariant_tsc(cpuinfo: str) -> bool:
    """Whether the TSC ticks at one rate whatever the core's frequency or sleep state."""
    return {"tsc", "constant_tsc", "nonstop_tsc"} <= cpu_flags(cpuinfo)


def _rdtsc_function() -> Callable[[], int]:
    """A callable running `rdtsc` in an executable page of its own (never writable and
    executable at once: written, then made read+execute)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of a page for rdtsc failed")
    ctypes.memmove(addr, _RDTSC_CODE, len(_RDTSC_CODE))
    if libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the rdtsc page failed")
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)  # the page lives as long as the process


def _paired_reading(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(TSC, ns) read together: of a few tries, the one whose rdtsc pair around the clock
    read is tightest (least disturbed by an interrupt or a preemption)."""
    best: tuple[int, int, int] | None = None
    for _ in range(_SAMPLES):
        before = rdtsc()
        ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        after = rdtsc()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, ns)
    assert best is not None
    return best[1], best[2]


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, or None where it cannot be told to a guest (not x86-64,
    no invariant TSC, no executable page allowed, or a reading out of reason): this boot's
    figure from the cache, else measured now and kept there."""
    boot_id = _boot_id()
    kept = cache_root() / "tsc-khz.json"
    try:
        doc = json.loads(kept.read_text())
        if boot_id and doc.get("boot_id") == boot_id and doc.get("khz") in _SANE_KHZ:
            return int(doc["khz"])
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # none kept for this boot (or not readable): measured now
    khz = _measure()
    if boot_id and khz is not None:
        _keep(kept, {"boot_id": boot_id, "khz": khz})
    return khz


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _keep(path: Path, doc: dict[str, object]) -> None:
    """Written whole or not at all (a rename); a cache that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tsc-khz.")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _measure() -> int | None:
    if platform.machine() != "x86_64":
        return None
    try:
        if not _invariant_tsc(Path("/proc/cpuinfo").read_text()):
            return None
        rdtsc = _rdtsc_function()
    except OSError:
        return None
    tsc0, ns0 = _paired_reading(rdtsc)
    time.sleep(_WINDOW_S)
    tsc1, ns1 = _paired_reading(rdtsc)
    if ns1 <= ns0 or tsc1 <= tsc0:
        return None
    khz = (tsc1 - tsc0) * 1_000_000 // (ns1 - ns0)
    return khz if khz in _SANE_KHZ else None
