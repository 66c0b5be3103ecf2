"""Warm start: restore a booted template of the machine instead of booting its kernel.

Under TCG a cold boot spends most of its time running the kernel's and the agent's start
code for the first time. A template is a QEMU snapshot (migration stream) of a guest that
has booted that far: agent answering, disks probed, no root filesystem mounted. Restoring it
and then asking the agent to mount the sandbox's disks skips the kernel boot entirely.

A template is keyed by everything its saved machine state depends on (QEMU binary, kernel,
initramfs, accelerator, vCPUs, memory, and the code that lays the machine out). Its two disks are
sparse placeholders of PLACEHOLDER_BYTES: the guest reads a disk's capacity once, when it
probes it, so a restored guest sees that size for the real disks, which must be no larger
(ext4 never reads past its own end; `lsblk` in the guest shows the placeholder size).

Every restored guest starts with the template's clock and random state: MicroVM reseeds the
guest CRNG from the host and sets the clock before anything else runs in it. The guest also
keeps the template's kernel command line: VMSpec.extra_cmdline reaches only QEMU's argv.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from isorun.images.locks import try_lock, unlock, wait_lock
from isorun.vmm import tsc
from isorun.vmm.accel import first_cpu_fields
from isorun.vmm.artifacts import cache_root

TEMPLATE_VERSION = 1
PLACEHOLDER_BYTES = 4 << 40  # guest-visible capacity of every warm-started disk
PRUNE_AFTER_S = 14 * 86400
MAX_TEMPLATES = 16  # at ~20-30 MB each
CRASH_LEFTOVER_S = 86400.0  # a make takes seconds: its .tmp/.work older than this are dead
# A template that could not be made, or restored, is not tried again (made, or restored) by
# this process for a while: each try costs a template boot or a restore before a cold boot.
RETRY_AFTER_S = 600.0


def template_dir() -> Path:
    return cache_root() / "warm"


def template_key(
    qemu: str, kernel: Path, initramfs: Path, accel: str, vcpus: int, memory_mib: int
) -> str:
    """What the saved machine state depends on: the binaries by identity (path, size,
    mtime, inode: a rebuilt one gets a new template without hashing tens of MB per boot),
    and the code that lays out the machine and makes the template by content."""
    # A TCG guest keeps the TSC rate its kernel booted with (tsc_early_khz): a template
    # made at another (the cache outlived a move to other hardware) would run its clock
    # at the wrong speed. Measured once per host boot (vmm/tsc.py), so the key is stable.
    rate = None if accel == "kvm" else tsc.host_tsc_khz()
    # A KVM guest's saved registers use the host CPU's features (XSAVE state, MSRs): a
    # template made on another CPU (a cache baked into a machine image), or before a
    # microcode or kernel change, may not load. TCG emulates the same CPU on any host.
    host = kvm_host_identity() if accel == "kvm" else None
    ident: list[object] = [TEMPLATE_VERSION, accel, vcpus, memory_mib, _code_hash(), rate, host]
    for p in (shutil.which(qemu) or qemu, kernel, initramfs):  # ISORUN_QEMU may be a name
        st = os.stat(p)
        ident.append([str(p), st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


_CPUINFO_FIELDS = ("vendor_id", "cpu family", "model", "stepping", "microcode", "flags")


@functools.cache
def kvm_host_identity() -> list[str]:
    """The host CPU as a KVM guest's saved state depends on it: model, microcode and
    flags of its first CPU, the kernel release, and whether nested virtualization is on."""
    try:
        cpu = first_cpu_fields(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = {}
    fields = {k: v for k, v in cpu.items() if k in _CPUINFO_FIELDS}
    nested = []
    for module in ("kvm_intel", "kvm_amd"):
        try:
            nested.append(Path(f"/sys/module/{module}/parameters/nested").read_text().strip())
        except OSError:
            nested.append("")
    return [json.dumps(fields, sort_keys=True), os.uname().release, *nested]


@functools.cache
def _code_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("qemu_cmd.py", "machine.py", "warm.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def fits(*disks: Path | int) -> bool:
    """Whether disks (files, or sizes in bytes) fit the template's placeholder capacity."""
    sizes = [d if isinstance(d, int) else os.stat(d).st_size for d in disks]
    return all(s <= PLACEHOLDER_BYTES for s in sizes)


def template_path(key: str) -> Path:
    return template_dir() / f"{key}.vmstate"


async def ensure_template(
    key: str,
    make: Callable[[Path], Awaitable[None]],
    may_make: Callable[[], bool] = lambda: True,
    wait_s: float | None = None,
) -> tuple[Path, bool] | None:
    """The template for key, made once (by `make(tmp_path)`) under a lock shared by every
    process on this cache, and whether this call made it. None when it is not there and
    may_make() says not to make it, or when another process has been making it for longer
    than wait_s."""
    path = template_path(key)
    if path.is_file():
        return path, False
    if not may_make():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = await wait_lock(path.with_suffix(".lock"), wait_s)
    if fd is None:
        return None
    try:
        if path.is_file():
            return path, False
        if not may_make():  # failed in this process while we waited
            return None
        for stale in path.parent.glob(f"{key}.tmp*"):  # left by a process that died making it
            stale.unlink(missing_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            await make(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        _untried.add(_file_id(os.stat(path)))
    finally:
        unlock(fd)
    _prune(keep=path)
    return path, True


# Templates this process made that no restore has used yet.
_untried: set[tuple[int, int]] = set()


def _file_id(st: os.stat_result) -> tuple[int, int]:
    """Which file (not which path): a template remade at the same path is another one."""
    return st.st_dev, st.st_ino


def untried(template: os.stat_result) -> bool:
    """Whether this process made this template file and has not restored it yet."""
    return _file_id(template) in _untried


def mark_used(template_fd: int) -> None:
    """A template restored: its mtime says when it was last used, which pruning goes by
    (atime is not kept on noatime mounts)."""
    _untried.discard(_file_id(os.fstat(template_fd)))
    with contextlib.suppress(OSError):
        os.utime(template_fd)


def _prune(keep: Path) -> None:
    """When a new template is made: templates unused for PRUNE_AFTER_S (older kernels,
    agents, QEMUs; each holds a booted guest's memory, ~20 MB), and the least recently used
    beyond MAX_TEMPLATES, go with their locks; so do locks of keys never made that long, and
    what crashed makes left.
    A template being made or pruned has its lock held; one being restored is open, which its
    deletion does not disturb."""
    now = time.time()
    used: list[tuple[float, Path]] = []
    for old in keep.parent.glob("*.vmstate"):
        with contextlib.suppress(OSError):
            if old == keep:
                continue
            mtime = old.stat().st_mtime
            if mtime < now - PRUNE_AFTER_S:
                _delete_locked(old.with_suffix(".lock"), old)
            else:
                used.append((mtime, old))
    # Beyond MAX_TEMPLATES (every sandbox shape gets one), the least recently used go.
    for _, old in sorted(used)[: max(0, len(used) + 1 - MAX_TEMPLATES)]:
        with contextlib.suppress(OSError):
            _delete_locked(old.with_suffix(".lock"), old)
    for lock in keep.parent.glob("*.lock"):
        with contextlib.suppress(OSError):
            orphan = not lock.with_suffix(".vmstate").exists()
            if orphan and lock.stat().st_mtime < now - PRUNE_AFTER_S:
                _delete_locked(lock)
    for junk in [*keep.parent.glob("*.tmp*"), *keep.parent.glob("*.work")]:
        with contextlib.suppress(OSError):
            if junk.lstat().st_mtime < now - CRASH_LEFTOVER_S:
                if junk.is_dir():
                    shutil.rmtree(junk)
                else:
                    junk.unlink()


def _delete_locked(lock: Path, *paths: Path) -> None:
    """Delete paths and then the lock file, holding the lock (skipped when it is held): a
    waiter on the old lock file then takes a new one (try_lock checks)."""
    fd = try_lock(lock)
    if fd is None:
        return
    try:
        for p in paths:
            p.unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
    finally:
        unlock(fd)


Attempt = Literal["make", "restore"]
_failed_at: dict[tuple[Path, Attempt], float] = {}


def failed_recently(path: Path, attempt: Attempt) -> bool:
    at = _failed_at.get((path, attempt))
    return at is not None and time.monotonic() - at < RETRY_AFTER_S


def note_failure(path: Path, attempt: Attempt) -> None:
    _failed_at[(path, attempt)] = time.monotonic()


def forget_failures() -> None:
    _failed_at.clear()


def discard(path: Path, restored: os.stat_result) -> None:
    """Drop a template that failed to restore (the file `restored` describes, not a newer
    one another process may have made at the same path since)."""
    with contextlib.suppress(OSError):
        if _file_id(os.stat(path)) == _file_id(restored):
            path.unlink()
