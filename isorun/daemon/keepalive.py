"""Keepalive records for the daemon's NDJSON streams.

A stream may say nothing for a long time (a silent command, a watch with no change, a
slow pull): every `every` seconds of silence it carries `{"type":"keepalive"}`, so a client
can tell a quiet stream from a dead daemon or network (the SDK times out a stream that
carries nothing for 4 intervals), and idle-timeout proxies keep the connection. E2B's
process streams carry keepalive events for the same reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

KEEPALIVE_LINE = b'{"type":"keepalive"}\n'


async def with_keepalives(lines: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """`lines`, with KEEPALIVE_LINE after each `every` seconds in which it yielded nothing.
    The pending read is kept across keepalives (never cancelled midway); closing this
    closes `lines`."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(lines))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEPALIVE_LINE
                continue
            finished, pending = pending, None
            try:
                line = finished.result()
            except StopAsyncIteration:
                return
            yield line
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()
