"""The writable disk of a sandbox: a sparse copy of a pre-formatted empty ext4.

Formatting once per size and copying sparsely is faster than mkfs per boot, and the copy
costs only the few metadata blocks mkfs wrote until the guest writes more. mkfs leaves the
inode tables unwritten: the file is sparse, so they read as zeros anyway, and the guest
mounts with `noinit_itable`, so its kernel starts no thread to zero them. (Zeroing them in
mkfs, as before, wrote 1/64 of the disk's size on the host while the template was made, 16
GiB for a 1 TiB disk, before punching it out again.) And no journal: the disk lives and dies
with its VM, and a journal-less mount is faster. It also holds the overlay's empty `upper`
and `work` directories, so the guest does not create them at boot.

One template per size asked for; one not used for IDLE_S is removed when another is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from isorun.errors import VMError
from isorun.images.locks import file_lock
from isorun.vmm.artifacts import cache_root, tool


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:  # cancelled: the tool must not run on without us
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        said = out.decode(errors="replace").strip()[:500]
        # the host's trouble, not a bad request: a full disk says so in its reason
        reason = "host_disk_full" if "No space left on device" in said else "host_tool"
        raise VMError(f"{os.path.basename(argv[0])} failed: {said}", reason)


VERSION = 5  # bumped whenever the layout changes; older versions' files are removed
CRASH_LEFTOVER_S = 86400.0
IDLE_S = 86400.0  # a size's template unused this long goes when another size's is made


async def template(size_mib: int) -> Path:
    path = cache_root() / "scratch" / f"empty-{size_mib}M-v{VERSION}.ext4"
    if path.parent.is_dir():
        _remove_older_versions(path.parent)
    if _whole(path, size_mib):
        _mark_used(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One maker per size across tasks and processes; the loser of the race finds it made.
    async with file_lock(path.with_suffix(".lock")):
        if _whole(path, size_mib):
            return path
        mkfs = tool("mkfs.ext4", "e2fsprogs")
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".make-") as work:
            tmp = Path(work) / "mkfs.ext4"
            await _format(mkfs, tmp, size_mib)
            # on disk before it takes the name every later boot trusts (a crash right after
            # could otherwise leave the name on an empty file)
            await asyncio.to_thread(_sync_then_replace, tmp, path)
        _remove_idle(path.parent)
    return path


def _mark_used(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(path)


def _remove_idle(cache: Path) -> None:
    """Every distinct size asked for makes a template: those not used for IDLE_S go (and
    their locks), or the sizes a tenant cycles through would stay for good."""
    for entry in cache.glob(f"empty-*M-v{VERSION}.ext4"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - entry.stat().st_mtime > IDLE_S:
                entry.unlink()
                entry.with_suffix(".lock").unlink(missing_ok=True)


def _whole(path: Path, size_mib: int) -> bool:
    """Whether the template is there at its full size: anything else (a file an older
    isorun renamed into place unsynced before a crash: empty) is made anew."""
    try:
        return path.stat().st_size == size_mib << 20
    except FileNotFoundError:
        return False


def _sync_then_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@functools.cache  # once per process: a sweep of a small directory
def _remove_older_versions(cache: Path) -> None:
    """Each layout change made every size's template anew under a new name; the old ones
    (and their locks) would stay in the cache for good. A process still running an older
    isorun remakes its own version if it needs it."""
    current = re.compile(rf"empty-\d+M-v{VERSION}\.(ext4|lock)")
    for entry in cache.glob("empty-*"):
        if not current.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                entry.unlink()
    # a make killed midway leaves its work dir (a live one is seconds old)
    for work in cache.glob(".make-*"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - work.stat().st_mtime > CRASH_LEFTOVER_S:
                shutil.rmtree(work, ignore_errors=True)


async def _format(mkfs: str, tmp: Path, size_mib: int) -> None:
    with tempfile.TemporaryDirectory() as tree:
        os.chmod(tree, 0o755)  # becomes the disk's root directory
        # The agent gives `upper` the image root's owner and mode at boot (docs/guest.md).
        for name in ("upper", "work"):
            os.mkdir(os.path.join(tree, name), 0o755)
        await _run(
            mkfs,
            "-q",
            "-F",
            "-L",
            "isorun-scratch",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1,nodiscard,root_owner=0:0",
            "-d",
            tree,
            str(tmp),
            f"{size_mib}M",
        )


async def make_scratch(dest: Path, size_mib: int) -> None:
    src = await template(size_mib)
    try:
        await _run("cp", "--sparse=always", "--reflink=auto", str(src), str(dest))
    except VMError:
        if src.exists():
            raise
        # removed as idle by another process at the moment this one took it up: once more
        src = await template(size_mib)
        await _run("cp", "--sparse=always", "--reflink=auto", str(src), str(dest))
