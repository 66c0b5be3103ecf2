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

from isorun.images.locks import file_lock, try_lock, unlock
from isorun.vmm.artifacts import cache_root

TEMPLATE_VERSION = 1
PLACEHOLDER_BYTES = 4 << 40  # guest-visible capacity of every warm-started disk
PRUNE_AFTER_S = 14 * 86400


def template_dir() -> Path:
    return cache_root() / "warm"


def template_key(
    qemu: str, kernel: Path, initramfs: Path, accel: str, vcpus: int, memory_mib: int
) -> str:
    """What the saved machine state depends on: the binaries by identity (path, size,
    mtime, inode: a rebuilt one gets a new template without hashing tens of MB per boot),
    and the code that lays out the machine and makes the template by content."""
    ident: list[object] = [TEMPLATE_VERSION, accel, vcpus, memory_mib, _code_hash()]
    for p in (shutil.which(qemu) or qemu, kernel, initramfs):  # ISORUN_QEMU may be a name
        st = os.stat(p)
        ident.append([str(p), st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


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


async def ensure_template(key: str, make: Callable[[Path], Awaitable[None]]) -> tuple[Path, bool]:
    """The template for key, made once (by `make(tmp_path)`) under a lock shared by every
    process on this cache; and whether this call made it."""
    path = template_path(key)
    if path.is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path, False
        for stale in path.parent.glob(f"{key}.tmp*"):  # left by a process that died making it
            stale.unlink(missing_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            await make(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    _prune(keep=path)
    return path, True


def mark_used(template_fd: int) -> None:
    """A template restored: its mtime says when it was last used, which pruning goes by
    (atime is not kept on noatime mounts)."""
    with contextlib.suppress(OSError):
        os.utime(template_fd)


def _prune(keep: Path) -> None:
    """Templates unused for PRUNE_AFTER_S (older kernels, agents, QEMUs) go, with their
    locks, when a new one is made: each holds the booted guest's memory (~20 MB)."""
    cutoff = time.time() - PRUNE_AFTER_S
    for old in keep.parent.glob("*.vmstate"):
        with contextlib.suppress(OSError):
            if old == keep or old.stat().st_mtime >= cutoff:
                continue
            lock = old.with_suffix(".lock")
            fd = try_lock(lock)
            if fd is None:
                continue  # being made or used right now
            try:
                old.unlink(missing_ok=True)
                lock.unlink()  # under the lock: a waiter then takes a new file (try_lock)
            finally:
                unlock(fd)


# A template that could not be made or restored is not tried again by this process for a
# while: each try costs a template boot or a restore before the cold boot.
RETRY_AFTER_S = 600.0
_failed_at: dict[Path, float] = {}


def failed_recently(path: Path) -> bool:
    at = _failed_at.get(path)
    return at is not None and time.monotonic() - at < RETRY_AFTER_S


def note_failure(path: Path) -> None:
    _failed_at[path] = time.monotonic()


def discard(path: Path, restored: os.stat_result) -> None:
    """Drop a template that failed to restore (the file `restored` describes, not a newer
    one another process may have made at the same path since)."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (restored.st_dev, restored.st_ino):
            path.unlink()
