"""open_watch returns once the guest watches: with agents that say so (`watch_ready` in their
hello), and at once with older ones; a guest that claims it and never says is not waited
for beyond a bound."""

from __future__ import annotations

import asyncio

import pytest
from fakeguest import connect, read_frame

from isorun.agent import client as client_mod
from isorun.agent import frames, mux
from isorun.agent.frames import Kind


def _event(chan: int, ev: dict[str, object]) -> bytes:
    return frames.encode_json(chan, Kind.EVENT, ev)


async def test_a_watch_ready_agent_is_waited_for_and_early_changes_are_kept() -> None:
    said_watching = asyncio.Event()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        assert req.json()["op"] == "watch"
        w.write(_event(req.chan, {"event": "fs", "op": "overflow", "path": "/d"}))
        await w.drain()
        await asyncio.sleep(0.3)
        said_watching.set()
        w.write(_event(req.chan, {"event": "watching"}))
        w.write(_event(req.chan, {"event": "fs", "op": "create", "path": "/d/a"}))
        await w.drain()
        await read_frame(r)  # the CANCEL

    agent, task = await connect(guest, features=["watch_ready"])
    w = await agent.open_watch("/d")
    assert said_watching.is_set()
    assert [await anext(w), await anext(w)] == [("overflow", "/d"), ("create", "/d/a")]
    w.close()
    await asyncio.wait_for(task, 5)


async def test_an_older_agent_is_not_waited_for() -> None:
    returned = asyncio.Event()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        await returned.wait()  # nothing is sent until open_watch has returned
        w.write(_event(req.chan, {"event": "fs", "op": "write", "path": "/d/a"}))
        await w.drain()
        await read_frame(r)

    agent, task = await connect(guest)  # no features in its hello
    # one that waited for any word from the guest would time out here
    w = await asyncio.wait_for(agent.open_watch("/d"), 5)
    returned.set()
    assert await anext(w) == ("write", "/d/a")
    w.close()
    await asyncio.wait_for(task, 5)


async def test_a_guest_that_never_says_watching_is_waited_for_at_most_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod, "WATCH_READY_S", 0.3)

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_frame(r)
        await read_frame(r)

    agent, task = await connect(guest, features=["watch_ready"])
    w = await asyncio.wait_for(agent.open_watch("/d"), 5)
    w.close()
    await asyncio.wait_for(task, 5)


async def test_changes_before_watching_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "WATCH_READY_S", 5)

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        for i in range(5000):  # a guest flooding changes before it says it watches
            w.write(_event(req.chan, {"event": "fs", "op": "create", "path": f"/d/{i}"}))
        w.write(_event(req.chan, {"event": "watching"}))
        await w.drain()
        await read_frame(r)

    agent, task = await connect(guest, features=["watch_ready"])
    w = await agent.open_watch("/d")
    early = [await anext(w) for _ in range(client_mod.WATCH_EARLY_MAX)]
    assert early[:3] == [("create", "/d/0"), ("create", "/d/1"), ("create", "/d/2")]
    assert early[-1] == ("overflow", "/d")  # the rest, dropped, said as one overflow
    w.close()
    await asyncio.wait_for(task, 5)


async def test_closing_a_watch_ends_the_iteration_another_task_waits_in() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        w.write(_event(req.chan, {"event": "watching"}))
        await w.drain()
        await read_frame(r)  # the CANCEL; then nothing more
        await asyncio.sleep(3600)

    agent, task = await connect(guest, features=["watch_ready"])
    w = await agent.open_watch("/d")

    async def consume() -> list[tuple[str, str]]:
        return [change async for change in w]

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)  # waiting for a change now
    w.close()  # a shutdown path closing the watch from elsewhere
    assert await asyncio.wait_for(consumer, 5) == []
    task.cancel()
    await agent.conn.close()


def _burst(chan: int, n: int, tag: str) -> bytes:
    return b"".join(
        _event(chan, {"event": "fs", "op": "create", "path": f"/d/{tag}{i:06}"}) for i in range(n)
    )


async def test_a_burst_a_busy_consumer_misses_is_an_overflow_not_the_watchs_end() -> None:
    """Open a watch, run something that makes 20,000 changes (npm install) before reading
    it: over the 1 MiB a request may hold, the watch said ConsumerTooSlowError and was
    cancelled. Now what it cannot hold is dropped for one overflow, and the watch goes on."""
    burst = 20_000
    caught_up, sent_second = asyncio.Event(), asyncio.Event()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        w.write(_event(req.chan, {"event": "watching"}))
        w.write(_burst(req.chan, burst, "a"))
        await w.drain()
        # Sent once the consumer took the overflow: until then the watch sheds what comes
        # (on a loaded machine the consumer is slow to get there).
        await caught_up.wait()
        w.write(_burst(req.chan, 3, "b"))
        await w.drain()
        sent_second.set()
        await read_frame(r)  # the CANCEL

    agent, task = await connect(guest, features=["watch_ready"])
    w = await agent.open_watch("/d")
    await asyncio.sleep(0.3)  # busy: the burst arrives meanwhile
    got = []
    while not got or got[-1] != ("overflow", "/d"):
        got.append(await asyncio.wait_for(anext(w), 5))
    kept = got[:-1]
    assert 0 < len(kept) < burst and kept == [("create", f"/d/a{i:06}") for i in range(len(kept))]
    assert agent.conn._event_bytes < 1000  # what it held is let go
    caught_up.set()
    await sent_second.wait()
    assert [await asyncio.wait_for(anext(w), 5) for _ in range(3)] == [
        ("create", f"/d/b{i:06}") for i in range(3)
    ]
    w.close()
    await asyncio.wait_for(task, 5)
    assert agent.conn._event_bytes == 0


async def test_watches_that_fell_behind_give_way_to_a_new_request() -> None:
    """Eight watches each past their own 1 MiB (kept, with a marker) fill the connection's
    8 MiB: a new request's event must make one of them let go, not cancel the request."""
    change = {"event": "fs", "op": "write", "path": "/" + "a" * 950}

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            f = await read_frame(r)
            if f.kind is not Kind.REQ:
                continue
            if f.json()["op"] == "watch":
                w.write(_event(f.chan, {"event": "watching"}))
                w.write(b"".join(_event(f.chan, change) for _ in range(1000)))
            else:
                w.write(_event(f.chan, {"event": "x", "pad": "p" * 20000}))
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "fake"}))
            await w.drain()

    agent, task = await connect(guest, features=["watch_ready"])
    watches = [await agent.open_watch("/d") for _ in range(8)]  # and not read for a while
    for _ in range(100):
        if agent.conn._event_bytes > mux.CONNECTION_EVENT_BACKLOG - 100_000:
            break
        await asyncio.sleep(0.02)
    assert (await asyncio.wait_for(agent.health(), 5))["version"] == "fake"
    # the one that gave way says so first; the others kept their changes
    firsts = [await asyncio.wait_for(anext(w), 5) for w in watches]
    assert firsts.count(("overflow", "/d")) == 1, firsts
    task.cancel()
    await agent.conn.close()


async def test_a_watch_that_fell_behind_before_it_was_ready_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst before "watching" (a recursive watch's walk of a busy tree) past what the
    watch may hold: "watching" may be among what was dropped, so open_watch does not wait
    for it (WATCH_READY_S, 30 s). A small bound makes the reader's first batch cross it."""
    monkeypatch.setattr(mux, "EVENT_BACKLOG", 50_000)
    change = {"event": "fs", "op": "create", "path": "/" + "a" * 950}

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        w.write(b"".join(_event(req.chan, change) for _ in range(1000)))
        w.write(_event(req.chan, {"event": "watching"}))  # dropped with the rest
        await w.drain()
        await read_frame(r)  # the CANCEL

    agent, task = await connect(guest, features=["watch_ready"])
    w = await asyncio.wait_for(agent.open_watch("/d"), 5)
    got = [await anext(w) for _ in range(len(w._early))]
    assert got[-1] == ("overflow", "/d") and got[0] == ("create", change["path"])
    w.close()
    await asyncio.wait_for(task, 5)
