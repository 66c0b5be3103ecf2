"""Cross-process, cancel-safe file locks (flock) for asyncio code."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """Take an exclusive flock without waiting; returns the fd or None when held elsewhere.
    The lock file may be deleted by its holder (the lock then passes to a new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us may have deleted the file (under the lock, as a prune
        # does): a lock on that file guards nothing any more; take the one now at path.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            unlock(fd)
            raise
        unlock(fd)


def try_lock_dir(path: Path) -> int | None:
    """try_lock on a directory itself (its fd): held while a work dir is in use, so one
    left by a crashed process (a dead process holds no lock) is known to be abandoned."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


async def wait_lock(path: Path, timeout: float | None = None, poll_s: float = 0.05) -> int | None:
    """try_lock until it succeeds (the fd) or `timeout` seconds have passed (None).
    flock conflicts between fds even in one process, so this also serializes tasks of one
    event loop; polling keeps it cancellable."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (fd := try_lock(path)) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll_s)
    return fd


@contextlib.asynccontextmanager
async def file_lock(path: Path, poll_s: float = 0.05) -> AsyncIterator[None]:
    """Hold an exclusive lock on `path` (waiting as long as it takes)."""
    fd = await wait_lock(path, None, poll_s)
    assert fd is not None
    try:
        yield
    finally:
        unlock(fd)
