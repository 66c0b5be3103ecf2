"""Progress streams (image pulls and builds, sandbox creation) as bounded NDJSON feeds.

Progress callbacks are synchronous and must never block the pull, so instead of making the
producer wait (as exec output does), a full feed coalesces: a new progress record replaces
the last queued one. A slow or stalled reader therefore sees fewer intermediate byte counts,
never an unbounded backlog; final records (`image`, `sandbox`, `error`) are always kept.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from isorun.images import ProgressEvent

# Same bound as exec output streams (isorun.daemon.http.STREAM_BACKLOG).
FEED_BACKLOG = 64


def progress_record(ev: ProgressEvent) -> dict[str, Any]:
    return {"type": "progress", **ev.to_json()}


class ProgressFeed:
    """Records from one producer task to one HTTP reader, at most `limit` (+1 final) queued."""

    def __init__(self, limit: int = FEED_BACKLOG) -> None:
        self.limit = limit
        self._q: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self.detached = False  # the reader went away; records are dropped from now on
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._q)

    def push(self, rec: dict[str, Any]) -> None:
        """Queue a record without ever waiting."""
        if self.detached or self._closed:
            return
        last = self._q[-1] if self._q else None
        is_progress = rec.get("type") == "progress"
        if (
            is_progress
            and last is not None
            and last.get("type") == "progress"
            and (len(self._q) >= self.limit or last.get("phase") == rec.get("phase") == "pulling")
        ):
            self._q[-1] = rec  # coalesce: only the newest state matters
            self.coalesced += 1
        else:
            self._q.append(rec)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            while True:
                while self._q:
                    yield (json.dumps(self._q.popleft(), separators=(",", ":")) + "\n").encode()
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
        finally:
            self.detached = True
