"""A write to the stdin of a process that does not read it waits for room a bounded time,
then fails saying so, with nothing of it sent: a client that gave up must not leave its
request (and its body) parked in the daemon for as long as the process runs."""

from __future__ import annotations

import asyncio

import pytest
from fakeguest import connect, read_frame

from isorun.agent.frames import Kind
from isorun.daemon import stdin as stdin_mod
from isorun.daemon.errors import Conflict


async def test_a_write_to_a_stdin_nobody_reads_fails_after_its_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stdin_mod, "STDIN_WAIT_S", 0.3)
    received: list[int] = []

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:  # an attach whose process never reads: IN frames get no credit back
            f = await read_frame(r)
            if f.kind is Kind.IN:
                received.append(len(f.payload))

    client, task = await connect(guest)
    pipe = stdin_mod.StdinPipe(client, "p1", asyncio.create_task)
    chunk = b"x" * stdin_mod.MAX_CHUNK
    # The first is taken into the channel (its window, 256 KiB, reaches the guest), the
    # next fill the pipe's queue, the rest find no room.
    writes = [pipe.write(chunk) for _ in range(stdin_mod.QUEUE_CHUNKS + 3)]
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 5)
    codes = [r.code if isinstance(r, Conflict) else r for r in results]
    assert codes == ["stdin_queued"] * (1 + stdin_mod.QUEUE_CHUNKS) + ["stdin_full"] * 2
    assert "nothing of this request was sent" in str(results[-1])
    assert sum(received) <= 256 * 1024  # the guest got no more than its window
    # A close that found no room queued no EOF: the stdin stays open, to write or close.
    with pytest.raises(Conflict) as refused:
        await asyncio.wait_for(pipe.close(), 5)
    assert refused.value.code == "stdin_full"
    assert not pipe.closing and not pipe.closed
    pipe.abandon()
    task.cancel()
    await client.conn.close()
