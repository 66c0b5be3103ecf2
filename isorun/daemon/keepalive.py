"""Keepalive records for the daemon's NDJSON streams.

A stream may say nothing for a long time (a silent command, a watch with no change, a
slow pull): every `every` seconds of silence it carries `{"type":"keepalive"}`, so a client
can tell a quiet stream from a dead daemon or network (the SDK times out a stream that
carries nothing for 4 intervals, and at least 90 s; /v1/health gives the interval), and
idle-timeout proxies keep the connection. E2B's process streams carry keepalive events for
the same reasons.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

KEEPALIVE_LINE = b'{"type":"keepalive"}\n'
_END = object()
# Lines the pump may read ahead: 1 costs ~14 us a line in task switches, 16 ~1.5 (30k
# 100-byte lines); the exec stream's own backlog is 64 records.
READ_AHEAD = 16


async def with_keepalives(lines: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """`lines`, with KEEPALIVE_LINE after each `every` seconds in which it yielded nothing.

    One task pumps `lines` through a queue; the response waits on the queue, which a
    timeout can interrupt without losing a line. The source runs at most READ_AHEAD lines
    ahead (back-pressure holds); a smaller queue costs a task switch per line. Closing
    this cancels the pump and closes `lines` (its `finally` runs) before this returns.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=READ_AHEAD)

    async def pump() -> None:
        try:
            async for line in lines:
                await queue.put(line)
        except Exception as exc:  # handed to the response, which raises it
            await queue.put(exc)
            return
        await queue.put(_END)

    pumping = asyncio.create_task(pump(), name="ndjson-pump")
    try:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(every):
                        item = await queue.get()
                except TimeoutError:
                    yield KEEPALIVE_LINE
                    continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, bytes)
            yield item
    finally:
        pumping.cancel()
        await asyncio.wait({pumping})  # raises only if this task itself is cancelled
        if not pumping.cancelled():
            pumping.exception()  # retrieved: the pump hands its errors on through the queue
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()
