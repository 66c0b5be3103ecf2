"""Progress of `ImageStore.ensure`: phase-level events a CLI can draw and a daemon can stream.

What a user sees, in order (each phase at most once, except `pulling` byte updates):

  registry ref, not cached:  resolving → pulling (bytes) … → unpacking → converting → done
  template, not cached:      building → converting → done
  cached (no conversion):    [resolving →] cached → done

`done` is always last and carries the digest; a failure raises instead (no event).
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from isorun.images.fstree import walk_lstat

Phase = Literal[
    "resolving", "pulling", "unpacking", "building", "converting", "waiting", "cached", "done"
]
PHASES: tuple[str, ...] = (
    "resolving",
    "pulling",
    "unpacking",
    "building",
    "converting",
    "waiting",
    "cached",
    "done",
)
POLL_S = 0.25


@dataclass(frozen=True)
class ProgressEvent:
    """One step of an image pull/build. Byte counts are set only where we can measure them
    (`pulling`: compressed bytes copied so far of `bytes_total`)."""

    phase: Phase
    ref: str
    message: str = ""
    digest: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


Progress = Callable[[ProgressEvent], None]


def _ignore(_: ProgressEvent) -> None:
    return None


def emitter(progress: Progress | None) -> Progress:
    """A callback that never raises into the pull (a broken renderer must not fail it)."""
    if progress is None:
        return _ignore
    cb = progress

    def emit(ev: ProgressEvent) -> None:
        with contextlib.suppress(Exception):
            cb(ev)

    return emit


def _tree_bytes(path: Path) -> int:
    return sum(st.st_size for _, st in walk_lstat(path) if stat.S_ISREG(st.st_mode))


@contextlib.asynccontextmanager
async def watch_bytes(
    path: Path, total: int, report: Callable[[int], None], interval: float = POLL_S
) -> AsyncIterator[None]:
    """While the body runs, report how many bytes have landed under `path` (capped at
    `total`) whenever that number changes; skopeo writes blobs there as it copies them."""
    last = -1

    async def poll() -> None:
        nonlocal last
        while True:
            await asyncio.sleep(interval)
            done = min(total, await asyncio.to_thread(_tree_bytes, path)) if path.exists() else 0
            if done != last:
                last = done
                report(done)

    task = asyncio.create_task(poll())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
