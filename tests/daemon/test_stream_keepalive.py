"""The daemon's NDJSON streams carry a keepalive record through every silence of
ISORUN_STREAM_KEEPALIVE_S (daemon/keepalive.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from isorun.daemon.keepalive import KEEPALIVE_LINE, with_keepalives
from isorun.sdk._progress import ProgressDecoder
from isorun.sdk._records import StreamDecoder


async def test_silences_carry_keepalives_and_lines_keep_their_order() -> None:
    seen_two = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"a\n"
        # silent until two keepalives went out: a stream without them would stall here
        await asyncio.wait_for(seen_two.wait(), 10)
        yield b"b\n"
        yield b"c\n"

    got: list[bytes] = []
    async for line in with_keepalives(source(), 0.1):
        got.append(line)
        if got.count(KEEPALIVE_LINE) == 2:
            seen_two.set()
    assert [x for x in got if x != KEEPALIVE_LINE] == [b"a\n", b"b\n", b"c\n"]
    assert 2 <= got.count(KEEPALIVE_LINE) <= 4  # not a flood either
    assert got.index(b"a\n") < got.index(KEEPALIVE_LINE) < got.index(b"b\n")
    assert json.loads(KEEPALIVE_LINE) == {"type": "keepalive"}


async def test_closing_the_stream_closes_its_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        try:
            yield b"a\n"
            await asyncio.sleep(3600)
            yield b"never\n"
        finally:
            closed.set()

    stream = with_keepalives(source(), 0.05)
    assert await anext(stream) == b"a\n"
    assert await anext(stream) == KEEPALIVE_LINE  # the source is waiting meanwhile
    await stream.aclose()  # the client went away
    await asyncio.wait_for(closed.wait(), 5)


async def test_a_source_error_ends_the_stream_with_it() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield b"a\n"
        raise RuntimeError("boom")

    stream = with_keepalives(source(), 1)
    assert await anext(stream) == b"a\n"
    try:
        await anext(stream)
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the source's error was swallowed")


def test_the_sdk_decoders_skip_keepalives() -> None:
    image = {"type": "image", "image": {"digest": "sha256:ab"}}
    progress = ProgressDecoder()
    for rec in (image, {"type": "keepalive"}):
        progress.feed(json.dumps(rec))
    assert progress.result("image") == image["image"]

    out = StreamDecoder()
    for rec in (
        {"type": "start", "proc_id": "p1", "pid": 7},
        {"type": "keepalive"},
        {"type": "stdout", "data": "aGkK"},
        {"type": "keepalive"},
        {"type": "exit", "exit_code": 0, "signal": None, "timed_out": False, "duration_ms": 1},
    ):
        out.feed(json.dumps(rec))
    assert out.result().stdout == "hi\n"
