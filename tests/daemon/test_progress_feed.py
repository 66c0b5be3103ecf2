"""The progress feed stays bounded for a stalled reader (no VM, no daemon)."""

from __future__ import annotations

import asyncio
import json

from isorun.daemon.progress import FEED_BACKLOG, ProgressFeed


def _pull(n: int) -> dict[str, object]:
    return {"type": "progress", "phase": "pulling", "bytes_done": n, "bytes_total": 10**6}


async def test_stalled_reader_gets_coalesced_records_and_the_final_one() -> None:
    feed = ProgressFeed()
    feed.push({"type": "progress", "phase": "resolving"})
    for i in range(100_000):
        feed.push(_pull(i))
    for i in range(200):  # phases the bound must hold against too
        feed.push({"type": "progress", "phase": f"p{i}"})
    assert len(feed) <= FEED_BACKLOG
    feed.push({"type": "image", "image": {"digest": "sha256:x"}})
    feed.close()
    recs = [json.loads(line) async for line in feed.lines()]
    assert recs[0]["phase"] == "resolving"
    assert recs[1] == _pull(99_999)  # byte updates coalesced to the newest
    assert recs[-1]["type"] == "image"
    assert len(recs) <= FEED_BACKLOG + 1


async def test_reader_that_keeps_up_sees_every_phase_in_order() -> None:
    feed = ProgressFeed()
    got: list[str] = []

    async def read() -> None:
        async for line in feed.lines():
            got.append(json.loads(line).get("phase", "final"))

    reader = asyncio.create_task(read())
    for phase in ("resolving", "pulling", "unpacking", "converting", "done"):
        feed.push({"type": "progress", "phase": phase})
        await asyncio.sleep(0)
    feed.push({"type": "image"})
    feed.close()
    await asyncio.wait_for(reader, 5)
    assert got == ["resolving", "pulling", "unpacking", "converting", "done", "final"]


async def test_detached_reader_drops_records() -> None:
    feed = ProgressFeed()
    lines = feed.lines()
    feed.push({"type": "progress", "phase": "resolving"})
    await lines.__anext__()
    await lines.aclose()  # the HTTP client went away
    for i in range(1000):
        feed.push(_pull(i))
    assert len(feed) == 0
