"""A hostile guest on the other end of a socketpair: each violation closes that
connection with a clear error and leaves other connections working."""

from __future__ import annotations

import asyncio
import gc
import statistics
import struct
import time
import timeit
import tracemalloc
from collections.abc import AsyncIterator

import pytest
from fakeguest import Guest
from fakeguest import connect as _connect
from fakeguest import read_frame as _read_frame

from isorun.agent import AgentClient, frames, mux
from isorun.agent import client as client_mod
from isorun.agent.client import Attachment
from isorun.agent.frames import Kind
from isorun.errors import ChannelClosedError, ConsumerTooSlowError, GuestError, ProtocolError


async def _health_guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        f = await _read_frame(r)
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "fake"}))
        await w.drain()


@pytest.fixture
async def bystander() -> AsyncIterator[AgentClient]:
    client, task = await _connect(_health_guest)
    yield client
    task.cancel()
    await client.conn.close()


def _after_request(payload: bytes) -> Guest:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_frame(r)
        w.write(payload)
        await w.drain()
        await asyncio.sleep(30)

    return guest


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xde\xad\xbe\xef" * 8, "exceeds|not allowed"),
        (struct.pack(">IIB", 0xFFFFFFFF, 1, Kind.OUT), "exceeds"),
        (frames.encode(1, Kind.REQ, b"{}"), "not allowed"),
        (frames.encode(99, Kind.OUT, b"x"), "never opened"),
        (frames.encode(1, Kind.RESP, b"not json"), "invalid JSON"),
        (frames.encode(1, Kind.RESP, b"[]"), "want an object"),
        (frames.encode(1, Kind.CREDIT, b"\x01"), "CREDIT frame"),
        (frames.encode(1, Kind.RESP, b"[" * 30000), "nests too deeply"),
        (frames.encode(1, Kind.EVENT, b'{"event":NaN}'), "invalid JSON"),
        (frames.encode(1, Kind.RESP, b'{"n":-1' + b"0" * 400 + b"}"), "out of range"),
    ],
    ids=[
        "garbage",
        "4GiB-length",
        "host-kind",
        "unknown-chan",
        "bad-json",
        "json-array",
        "bad-credit",
        "deep-json",
        "nan",
        "huge-int",
    ],
)
async def test_violation_kills_only_that_connection(
    payload: bytes, message: str, bystander: AgentClient
) -> None:
    client, task = await _connect(_after_request(payload))
    with pytest.raises(ProtocolError, match=message):
        await asyncio.wait_for(client.health(), 5)
    assert client.conn.is_closed
    with pytest.raises(ProtocolError):
        await client.health()  # the connection stays dead with the same reason
    assert (await bystander.health())["version"] == "fake"
    task.cancel()


async def test_close_mid_frame_fails_pending_requests(bystander: AgentClient) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_frame(r)
        w.write(frames.encode_json(1, Kind.RESP, {"ok": True})[:7])
        await w.drain()
        w.close()

    client, task = await _connect(guest)
    with pytest.raises(ChannelClosedError, match="closed"):
        await asyncio.wait_for(client.health(), 5)
    assert (await bystander.health())["ok"] is True
    task.cancel()


async def test_guest_overrunning_its_credit_window_is_cut_off() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        chunk = frames.encode(f.chan, Kind.OUT, b"x" * frames.MAX_GUEST_PAYLOAD)
        for _ in range(9):  # 9 x 32 KiB > the 256 KiB window, with no credit returned
            w.write(chunk)
        await w.drain()
        await asyncio.sleep(30)

    client, task = await _connect(guest)
    # A consumer that never reads leaves the window closed: the overrun must still be seen.
    ch = client.conn.open_channel()
    await client.conn.request(ch, {"op": "exec", "cmd": "yes"})
    await asyncio.wait_for(client.conn.wait_closed(), 5)
    assert isinstance(client.conn.closed_error(), ProtocolError)
    assert "window" in str(client.conn.closed_error())
    task.cancel()


@pytest.mark.parametrize("over", [0, 1])
async def test_a_file_read_lets_the_guest_send_its_wider_window_ahead(over: int) -> None:
    """A download's window is READ_WINDOW, not WINDOW (a credit's round trip under TCG
    bounded downloads): the guest may send that much before the reader takes any, and
    not a byte more."""
    size = client_mod.READ_WINDOW + over
    sent = asyncio.Event()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        assert f.json()["op"] == "read_file"
        w.write(frames.encode(f.chan, Kind.OUT, b"x"))  # what the reader takes first
        await w.drain()
        await asyncio.sleep(0.2)
        most = frames.MAX_GUEST_PAYLOAD
        for at in range(1, size, most):
            w.write(frames.encode(f.chan, Kind.OUT, b"x" * min(most, size - at)))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True}))
        await w.drain()
        sent.set()
        await asyncio.sleep(30)

    client, task = await _connect(guest)
    reader = client.read_file("/big")
    got = len(await reader.__anext__())  # 1 byte taken: no credit returned
    await asyncio.wait_for(sent.wait(), 5)
    await asyncio.sleep(0.2)  # the host has read it all
    if over:
        with pytest.raises(ProtocolError, match="window"):
            async for chunk in reader:
                got += len(chunk)
    else:
        async for chunk in reader:
            got += len(chunk)
        assert got == size
    task.cancel()


async def test_stalled_downloads_hold_a_bounded_amount_of_one_connection() -> None:
    # Each download may get READ_WINDOW ahead of its consumer, held while that consumer (an
    # HTTP client that stopped reading) stalls: 256 of them held 514 MiB of the daemon. The
    # guest sends whatever its credit allows; what it was allowed is what the host holds.
    allowed: dict[int, int] = {}
    chunk = b"x" * frames.MAX_GUEST_PAYLOAD

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sent: dict[int, int] = {}
        while True:
            f = await _read_frame(r)
            if f.kind is Kind.REQ and f.json()["op"] == "read_file":
                allowed[f.chan], sent[f.chan] = mux.WINDOW, 0
            elif f.kind is Kind.REQ:  # anything else: answered, once what came before was
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True}))
            elif f.kind is Kind.CREDIT and f.chan in allowed:
                allowed[f.chan] += f.credit()
            elif f.kind is Kind.CANCEL:
                allowed.pop(f.chan, None)
                sent.pop(f.chan, None)
            for chan, may in allowed.items():
                while sent[chan] < may:
                    part = chunk[: may - sent[chan]]
                    w.write(frames.encode(chan, Kind.OUT, part))
                    sent[chan] += len(part)
            await w.drain()

    client, task = await _connect(guest)
    client.conn.widened_limit = 8 << 20
    downloads = [client.read_file("/big") for _ in range(16)]
    for download in downloads:
        await download.__anext__()  # the response started, and its client stopped reading
    await client.call("sync")  # the guest has seen every credit
    assert sum(allowed.values()) <= client.conn.widened_limit + 16 * mux.WINDOW
    assert max(allowed.values()) == client_mod.READ_WINDOW  # the first ones were widened
    for download in downloads:
        await download.aclose()
    fresh = client.read_file("/big")
    await fresh.__anext__()
    await client.call("sync")
    assert len(allowed) == 1 and max(allowed.values()) == client_mod.READ_WINDOW
    await fresh.aclose()
    task.cancel()
    await client.conn.close()


async def test_guest_that_stops_reading_but_keeps_streaming_is_cut_off(
    bystander: AgentClient,
) -> None:
    # The guest reads the exec request, then nothing (not even the credits it is sent), and
    # streams output paced to stay inside the window as the host counts it. The host's
    # consumer keeps up, so a CREDIT is queued per 64 KiB taken: they used to pile up in the
    # host's write buffer for as long as the guest streamed (~208 bytes per MiB).
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        w.transport.pause_reading()  # not even into the guest's own stream buffer
        chunk = frames.encode(f.chan, Kind.OUT, b"x" * 32759)
        while True:
            w.write(chunk * 2)
            await w.drain()
            await asyncio.sleep(0.002)  # well inside the window the host credited

    # A small socket buffer and limit so that this takes ~40 MiB, not ~80 GiB: what piles
    # up is a few bytes per 64 KiB streamed.
    client, task = await _connect(guest, host_sndbuf=1)
    client.conn.write_backlog = 4096
    taken = 0

    def take(data: bytes) -> None:
        nonlocal taken
        taken += len(data)

    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(client.exec("yes", on_stdout=take, capture=False), 30)
    assert err.value.code == "unresponsive"
    assert "stopped reading its agent port" in str(err.value)
    assert client.conn.is_closed and client.conn.failed  # the sandbox sees its agent fail
    assert taken > 1 << 20
    assert (await bystander.health())["ok"] is True
    task.cancel()


async def test_guest_error_answer_becomes_guest_error() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        w.write(
            frames.encode_json(
                f.chan, Kind.RESP, {"ok": False, "code": "not_found", "error": "/x: no such file"}
            )
        )
        await w.drain()
        await asyncio.sleep(30)

    from isorun.errors import FileNotFoundInGuest

    client, task = await _connect(guest)
    with pytest.raises(FileNotFoundInGuest, match="no such file"):
        await client.stat("/x")
    task.cancel()


async def test_close_does_not_hang_on_a_guest_that_stopped_reading() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # reads nothing after hello: the host's writes pile up

    client, task = await _connect(guest)
    senders = []
    for _ in range(4):  # 4 windows of stdin: more than the socket buffers hold
        ch = client.conn.open_channel()
        await client.conn.request(ch, {"op": "write_file", "path": "/x"})
        senders.append(asyncio.create_task(ch.send_data(b"x" * 262144)))
    await asyncio.sleep(0.3)
    assert client.conn._writer.transport.get_write_buffer_size() > 0
    stuck = [s for s in senders if not s.done()]
    assert stuck
    await asyncio.wait_for(client.conn.close(), 5)
    # Every sender stuck in drain() is released with the connection's error.
    for s in stuck:
        with pytest.raises(ChannelClosedError, match="closed by the host"):
            await asyncio.wait_for(s, 5)
    task.cancel()


def _stream_then_answer(n_frames: int) -> Guest:
    """Answers the first request with n one-byte OUT frames and a RESP (no matter what the
    host says meanwhile), every later request with a plain RESP."""

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for _ in range(n_frames):
            w.write(frames.encode(f.chan, Kind.OUT, b"x"))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "proc_id": "p1"}))
        await w.drain()
        while True:
            f = await _read_frame(r)
            if f.kind is Kind.REQ:
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "fake"}))
                await w.drain()

    return guest


async def test_an_abandoned_request_does_not_stall_the_connection() -> None:
    # More frames in flight than a channel queues: nobody reads them once the consumer
    # failed, so queueing them would stop the reader, and every request, for good.
    client, task = await _connect(_stream_then_answer(2000))

    def broken_consumer(_: bytes) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        await client.exec("yes", on_stdout=broken_consumer)
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    assert client.conn._channels == {}  # the abandoned channel ended at its RESP
    task.cancel()
    await client.conn.close()


async def test_a_request_cancelled_by_its_caller_is_forgotten_at_its_answer() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        assert (await _read_frame(r)).kind is Kind.CANCEL
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": False, "error": "cancelled"}))
        await w.drain()
        await _health_guest(r, w)

    client, task = await _connect(guest)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.call("kill", proc_id="p1"), 0.2)
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    assert client.conn._channels == {}
    task.cancel()
    await client.conn.close()


async def test_write_file_answered_early_fails_instead_of_waiting_for_credit() -> None:
    # As the real agent does for a path it cannot create: answer at once, then drop the IN
    # frames of the closed channel without granting credit for them.
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        w.write(
            frames.encode_json(
                f.chan, Kind.RESP, {"ok": False, "code": "is_dir", "error": "/d is a directory"}
            )
        )
        await w.drain()
        while True:
            await _read_frame(r)

    from isorun.errors import GuestError

    client, task = await _connect(guest)
    with pytest.raises(GuestError, match="is a directory"):
        await asyncio.wait_for(client.write_file("/d", b"x" * (1 << 20)), 5)
    task.cancel()
    await client.conn.close()


async def test_a_failing_stdin_source_fails_the_exec_and_cancels_it() -> None:
    seen: list[Kind] = []

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        while True:  # a process that waits for stdin's EOF before it exits
            g = await _read_frame(r)
            seen.append(g.kind)
            if g.kind is Kind.IN:  # taken into the pipe
                w.write(frames.encode_credit(f.chan, len(g.payload)))
            if g.kind is Kind.CANCEL:
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "signal": 15}))
                await w.drain()

    async def source() -> AsyncIterator[bytes]:
        yield b"first line\n"
        raise OSError("upload body broke off")

    client, task = await _connect(guest)
    with pytest.raises(OSError, match="upload body broke off"):
        await asyncio.wait_for(client.exec("cat", stdin=source()), 5)
    for _ in range(100):  # the fake guest reads the CANCEL on its own schedule
        if seen and seen[-1] is Kind.CANCEL:
            break
        await asyncio.sleep(0.05)
    assert seen[-1] is Kind.CANCEL and Kind.EOF not in seen
    task.cancel()
    await client.conn.close()


async def test_a_consumer_that_does_not_read_stalls_no_other_request() -> None:
    # 600 short lines are far inside the credit window but were more frames than a channel
    # queued: the one reader then waited for this consumer, and every request with it.
    lines = [f"line {i:04d}\n".encode() * 8 for i in range(600)]

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for line in lines:
            w.write(frames.encode(f.chan, Kind.OUT, line))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await _health_guest(r, w)

    client, task = await _connect(guest)
    go_on = asyncio.Event()

    async def slow_consumer(_: bytes) -> None:
        await go_on.wait()

    exec_task = asyncio.create_task(client.exec("yes", on_stdout=slow_consumer))
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    go_on.set()
    result = await asyncio.wait_for(exec_task, 5)
    assert result.stdout == b"".join(lines)  # all of it, in order
    task.cancel()
    await client.conn.close()


async def test_output_in_tiny_frames_is_held_compactly_and_arrives_whole() -> None:
    # A frame per byte, a window's worth, while the consumer is not reading: the host
    # holds a few items, not one per frame.
    client, task = await _connect(_stream_then_answer(200_000))
    ch = client.conn.open_channel()
    await client.conn.request(ch, {"op": "exec", "cmd": "yes"})
    for _ in range(200):
        if any(item for item in ch._inbox if isinstance(item, frames.Frame)):
            break  # the RESP arrived: everything before it is queued
        await asyncio.sleep(0.02)
    assert len(ch._inbox) <= 2 + 200_000 // mux.MAX_JOINED
    got = b""
    while (frame := await ch.next()).kind is Kind.OUT:
        got += frame.payload
    assert got == b"x" * 200_000 and frame.kind is Kind.RESP
    task.cancel()
    await client.conn.close()


async def test_events_nobody_takes_cancel_that_request_not_the_connection() -> None:
    seen: list[Kind] = []

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        event = {"event": "fs", "op": "write", "path": "/" + "a" * 1000}
        for _ in range(2000):  # 2 MB of events: more than a channel may hold
            w.write(frames.encode_json(f.chan, Kind.EVENT, event))
        await w.drain()
        while True:
            g = await _read_frame(r)
            seen.append(g.kind)
            if g.kind is Kind.REQ:
                w.write(frames.encode_json(g.chan, Kind.RESP, {"ok": True, "version": "fake"}))
                await w.drain()

    client, task = await _connect(guest)
    ch = client.conn.open_channel()
    await client.conn.request(ch, {"op": "watch", "path": "/"})  # and never read
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    for _ in range(100):
        if Kind.CANCEL in seen:
            break
        await asyncio.sleep(0.05)
    assert Kind.CANCEL in seen
    assert client.conn._event_bytes == 0  # what was held is let go
    with pytest.raises(ConsumerTooSlowError, match="not taken in time"):
        await asyncio.wait_for(ch.next(), 5)
    assert not client.conn.is_closed
    task.cancel()
    await client.conn.close()


@pytest.mark.parametrize("sheds", [False, True], ids=["requests", "watches"])
async def test_past_the_connections_event_bound_the_biggest_backlog_goes_not_a_new_request(
    sheds: bool,
) -> None:
    """Requests nobody reads hold just under the connection's 8 MiB of events between them
    (each under its own 1 MiB); a new request's first event crosses the bound. The
    unanswered request holding the most is cancelled: not the new one, which holds
    nothing, nor one the guest already answered (the biggest here), whose caller would be
    told a request failed that ran. A watch (which sheds events) is not cancelled: its
    events are dropped for one that says so (an overflow to its consumer)."""
    watch_event = {"event": "fs", "op": "write", "path": "/" + "a" * 950}  # 1116 B held
    sizes = [819] * 8
    sizes[4] = 870  # the biggest unanswered backlog

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        watches = 0
        while True:
            f = await _read_frame(r)
            if f.kind is not Kind.REQ:
                continue
            op = f.json()["op"]
            if op == "exec":  # ran and answered, its events and answer not read yet
                for _ in range(900):
                    w.write(frames.encode_json(f.chan, Kind.EVENT, watch_event))
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
            elif op == "watch":
                for _ in range(sizes[watches]):
                    w.write(frames.encode_json(f.chan, Kind.EVENT, watch_event))
                watches += 1
            else:
                w.write(frames.encode_json(f.chan, Kind.EVENT, {"event": "x", "pad": "p" * 20000}))
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "fake"}))
            await w.drain()

    client, task = await _connect(guest)
    ran = client.conn.open_channel()
    await client.conn.request(ran, {"op": "exec", "cmd": "true"})
    slow = [client.conn.open_channel() for _ in sizes]
    for ch in slow:
        ch.sheds_events = sheds
        await client.conn.request(ch, {"op": "watch", "path": "/"})  # and never read
    for _ in range(200):  # ~8.37 MB held
        if client.conn._event_bytes > mux.CONNECTION_EVENT_BACKLOG - 20000:
            break
        await asyncio.sleep(0.02)
    assert client.conn._event_bytes > mux.CONNECTION_EVENT_BACKLOG - 20000
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    if sheds:
        assert not any(ch.closed for ch in slow)
        assert (await asyncio.wait_for(slow[4].next(), 5)).payload == mux.DROPPED_EVENT
        assert (await asyncio.wait_for(slow[3].next(), 5)).json()["op"] == "write"
    else:
        assert [ch.closed for ch in slow] == [i == 4 for i in range(len(sizes))]
        with pytest.raises(ConsumerTooSlowError, match="not taken in time"):
            await asyncio.wait_for(slow[4].next(), 5)
    while (frame := await asyncio.wait_for(ran.next(), 5)).kind is Kind.EVENT:
        pass
    assert frame.kind is Kind.RESP and frame.json()["exit_code"] == 0  # its answer kept
    assert not client.conn.is_closed
    task.cancel()
    await client.conn.close()


async def test_a_request_given_up_is_forgotten_even_if_the_guest_never_answers() -> None:
    requests: list[int] = []

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            f = await _read_frame(r)
            if f.kind is not Kind.REQ:
                continue
            requests.append(f.chan)
            if len(requests) == 3:  # late answers to the two given up, then this one
                for chan in requests[:2]:
                    w.write(frames.encode(chan, Kind.OUT, b"late"))
                    w.write(frames.encode_json(chan, Kind.RESP, {"ok": True}))
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "x"}))
                await w.drain()

    client, task = await _connect(guest)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.health(), 0.1)
    assert client.conn._channels == {}
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "x"
    assert not client.conn.is_closed  # frames for requests given up are dropped, not fatal
    task.cancel()
    await client.conn.close()


async def test_a_listing_is_bounded_by_the_bytes_the_guest_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Entries of 20 KiB paths: a count limit alone let a guest hold ~2 GB of host memory.
    monkeypatch.setattr(client_mod, "MAX_LISTING_BYTES", 1 << 20)
    entry = {"name": "n", "path": "/" + "p" * 20000, "type": "file", "size": 0, "mode": 420}

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for _ in range(60):
            w.write(
                frames.encode_json(f.chan, Kind.EVENT, {"event": "entries", "entries": [entry]})
            )
            await w.drain()
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "count": 60}))
        await w.drain()
        await _health_guest(r, w)

    client, task = await _connect(guest)
    with pytest.raises(GuestError, match="1 MiB"):
        await asyncio.wait_for(client.list("/", depth=1), 5)
    assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    task.cancel()
    await client.conn.close()


async def test_a_process_listing_shows_what_the_agent_promises_whatever_it_is_sent() -> None:
    # 1,024 two-byte arguments per process in 8,192 processes: 40 MiB on the wire became
    # ~600 MiB of Python strings (and each stream/kill/stdin call lists the processes).
    proc = {"proc_id": "p1", "pid": 7, "running": True, "argv": ["ab"] * 1024}
    answer = frames.encode_json(1, Kind.RESP, {"ok": True, "procs": [proc]})
    client, task = await _connect(_after_request(answer))
    (listed,) = await asyncio.wait_for(client.list_procs(), 5)
    assert listed.argv_truncated and listed.argv == ["ab"] * 409  # 409 x (2 + 3) <= 2048
    task.cancel()
    await client.conn.close()


async def test_a_listing_costs_its_entries_not_only_their_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5,000 small entries weigh ~0.4 MiB on the wire and ~5x that as Python objects.
    monkeypatch.setattr(client_mod, "MAX_LISTING_BYTES", 1 << 20)
    batch = [
        {"name": f"{i}", "path": f"/d/{i}", "type": "file", "size": 0, "mode": 420}
        for i in range(5000)
    ]
    answer = b"".join(
        frames.encode_json(1, Kind.EVENT, {"event": "entries", "entries": batch[i : i + 250]})
        for i in range(0, len(batch), 250)
    )
    client, task = await _connect(_after_request(answer))
    with pytest.raises(GuestError, match="1 MiB"):
        await asyncio.wait_for(client.list("/d"), 5)
    task.cancel()
    await client.conn.close()


async def test_a_listing_is_bounded_by_what_its_strings_hold_not_their_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ASCII but for one emoji: CPython holds each character of such a path in 4 bytes (and
    # the sort copies it). Counted by bytes on the wire, 64 MiB "within the bound" held 253
    # MiB, 505 at its peak.
    monkeypatch.setattr(client_mod, "MAX_LISTING_BYTES", 1 << 20)
    path = "/" + "a" * 5000 + "\U0001f600"
    batch = [{"name": "n", "path": path, "type": "file", "size": 0, "mode": 420}] * 5
    event = frames.encode_json(1, Kind.EVENT, {"event": "entries", "entries": batch})
    answer = event * 20 + frames.encode_json(1, Kind.RESP, {"ok": True})
    assert len(answer) < 600_000  # on the wire, and 100 entries: far inside the old count
    client, task = await _connect(_after_request(answer))
    with pytest.raises(GuestError, match="1 MiB"):
        await asyncio.wait_for(client.list("/"), 5)
    task.cancel()
    await client.conn.close()


async def test_a_process_listing_is_bounded_by_what_its_strings_hold_not_their_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod, "MAX_LISTING_BYTES", 1 << 20)
    proc = {"proc_id": "p1", "pid": 7, "running": True, "argv": ["a" * 2000 + "\U0001f600"]}
    event = frames.encode_json(1, Kind.EVENT, {"event": "procs", "procs": [proc] * 10})
    answer = event * 20 + frames.encode_json(1, Kind.RESP, {"ok": True, "procs": []})
    assert len(answer) < 600_000
    client, task = await _connect(_after_request(answer))
    with pytest.raises(ProtocolError, match="exceeds 1 MiB"):
        await asyncio.wait_for(client.list_procs(), 5)
    task.cancel()
    await client.conn.close()


@pytest.mark.parametrize(
    ("field", "value"), [("tag", "t" * 1025), ("proc_id", "p" * 65)], ids=["tag", "proc_id"]
)
async def test_a_listed_process_named_longer_than_an_agent_names_one_is_a_violation(
    field: str, value: str
) -> None:
    # The agent refuses a tag over 1 KiB; unbounded, 64 K wide characters each made one
    # process's entry hold 256 KiB.
    proc = {"proc_id": "p1", "pid": 7, "running": True, field: value}
    answer = frames.encode_json(1, Kind.RESP, {"ok": True, "procs": [proc]})
    client, task = await _connect(_after_request(answer))
    with pytest.raises(ProtocolError, match=f"process {field} from guest is {len(value)} char"):
        await asyncio.wait_for(client.list_procs(), 5)
    task.cancel()
    await client.conn.close()


@pytest.mark.parametrize(
    ("name", "path"), [("n" * 256, "/n"), ("n", "/" + "a/" * 11_000 + "n")], ids=["name", "path"]
)
async def test_file_entries_longer_than_linux_allows_are_violations(name: str, path: str) -> None:
    entry = {"name": name, "path": path, "type": "file", "size": 0, "mode": 420}
    answer = frames.encode_json(1, Kind.EVENT, {"event": "entries", "entries": [entry]})
    client, task = await _connect(_after_request(answer))
    with pytest.raises(ProtocolError, match="longer than"):
        await asyncio.wait_for(client.list("/"), 5)
    task.cancel()
    await client.conn.close()


async def test_a_listing_is_sorted_by_path_components() -> None:
    # "a b" sorts after everything under "a" (components compared), as before the sort key
    # stopped splitting every path into a list.
    paths = ["/a b", "/a/z", "/a", "/a/y/x", "/a-b/c", "/a/y"]
    batch = [
        {"name": p.rsplit("/", 1)[1], "path": p, "type": "file", "size": 0, "mode": 420}
        for p in paths
    ]
    answer = frames.encode_json(1, Kind.EVENT, {"event": "entries", "entries": batch})
    answer += frames.encode_json(1, Kind.RESP, {"ok": True})
    client, task = await _connect(_after_request(answer))
    listed = await asyncio.wait_for(client.list("/"), 5)
    assert [e.path for e in listed] == ["/a", "/a/y", "/a/y/x", "/a/z", "/a b", "/a-b/c"]
    task.cancel()
    await client.conn.close()


async def test_an_attach_adds_up_gaps_instead_of_keeping_each() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        w.write(frames.encode_json(f.chan, Kind.EVENT, {"event": "attached", "offset": 5}))
        for _ in range(20000):
            w.write(frames.encode_json(f.chan, Kind.EVENT, {"event": "gap", "lost": 3}))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(30)

    client, task = await _connect(guest)
    att = Attachment(offset=0)
    result = await asyncio.wait_for(client.attach("p1", attachment=att), 5)
    assert result.exit_code == 0
    assert (att.offset, att.gap_bytes) == (5, 60000)
    task.cancel()
    await client.conn.close()


async def test_a_lone_surrogate_in_a_guest_string_is_a_violation() -> None:
    client, task = await _connect(
        _after_request(frames.encode(1, Kind.RESP, b'{"ok":false,"code":"io","error":"\\udc80"}'))
    )
    with pytest.raises(ProtocolError, match="lone surrogate"):
        await asyncio.wait_for(client.health(), 5)
    task.cancel()
    await client.conn.close()


async def test_an_exec_the_guest_never_ends_fails_after_its_timeout_and_a_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod, "EXEC_DEADLINE_GRACE_S", 0.2)
    seen: list[Kind] = []

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:  # ignores timeout_ms, never answers
            seen.append((await _read_frame(r)).kind)

    client, task = await _connect(guest)
    with pytest.raises(GuestError, match=r"did not end the command within its 0\.3 s timeout"):
        await asyncio.wait_for(client.exec("sleep 100", timeout=0.3), 5)
    assert client.conn._channels == {}
    for _ in range(100):
        if Kind.CANCEL in seen:
            break
        await asyncio.sleep(0.02)
    assert seen == [Kind.REQ, Kind.CANCEL]
    task.cancel()
    await client.conn.close()


async def test_stdout_stays_in_order_for_a_slow_consumer() -> None:
    # Frames of varied sizes (the agent's are up to 32759 bytes): the last, small one used
    # to join an older item with room and overtake the 65 KB sent before it.
    sizes = [32759, 7000, 32759, 32759, 100]
    parts = [bytes([65 + i]) * n for i, n in enumerate(sizes)]

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for part in parts:
            w.write(frames.encode(f.chan, Kind.OUT, part))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(30)

    client, task = await _connect(guest)

    async def slow(_: bytes) -> None:
        await asyncio.sleep(0.05)

    result = await asyncio.wait_for(client.exec("yes", on_stdout=slow), 5)
    assert result.stdout == b"".join(parts)
    task.cancel()
    await client.conn.close()


async def test_what_a_guest_sends_after_its_answer_is_not_held() -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        event = {"event": "x", "pad": "p" * 30000}
        while True:
            f = await _read_frame(r)
            if f.kind is not Kind.REQ:
                continue
            w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "version": "fake"}))
            for _ in range(16):  # after the answer: nobody takes these
                w.write(frames.encode_json(f.chan, Kind.EVENT, event))
            await w.drain()

    client, task = await _connect(guest)
    for _ in range(10):  # each used to leave ~1 MB counted against the connection for good
        assert (await asyncio.wait_for(client.health(), 5))["version"] == "fake"
    await asyncio.sleep(0.2)
    assert client.conn._event_bytes == 0
    task.cancel()
    await client.conn.close()


async def test_the_exec_deadline_times_the_guest_not_the_callers_callbacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_mod, "EXEC_DEADLINE_GRACE_S", 0.1)

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            f = await _read_frame(r)
            if f.kind is Kind.REQ:  # answers at once
                w.write(frames.encode(f.chan, Kind.OUT, b"out"))
                w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
                await w.drain()

    client, task = await _connect(guest)

    async def slow(_: bytes) -> None:
        await asyncio.sleep(0.5)  # past timeout + grace

    result = await asyncio.wait_for(client.exec("true", timeout=0.1, on_stdout=slow), 5)
    assert (result.exit_code, result.stdout) == (0, b"out")

    def raising(_: bytes) -> None:
        raise TimeoutError("the caller's own")

    with pytest.raises(TimeoutError, match="the caller's own"):
        await asyncio.wait_for(client.exec("true", timeout=0.1, on_stdout=raising), 5)
    task.cancel()
    await client.conn.close()


async def test_a_flood_of_started_events_reaches_the_caller_once() -> None:
    # Events have no credit: each 'started' used to be handed on (the daemon queued a
    # record for each, past its stream backlog: 370 MiB from one guest).
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for i in range(500):
            w.write(
                frames.encode_json(
                    f.chan, Kind.EVENT, {"event": "started", "proc_id": f"p{i}", "pid": i}
                )
            )
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(30)

    client, task = await _connect(guest)
    starts: list[tuple[str, int]] = []
    await asyncio.wait_for(client.exec("true", on_start=lambda p, pid: starts.append((p, pid))), 5)
    assert starts == [("p0", 0)]
    task.cancel()
    await client.conn.close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b'{"ok":true,"mem_total_bytes":1' + b"0" * 400 + b"}", "out of range"),
        (
            b'{"ok":true,"procs":[{"proc_id":"p1","pid":1,"running":true,"argv":["\\udc80"]}]}',
            "surrogate",
        ),
        (b'{"ok":true,"procs":[{"proc_id":"p1","pid":-4,"running":true}]}', "negative"),
        (
            b'{"ok":true,"procs":[{"proc_id":"p1","pid":4,"running":true,"output_bytes":-1}]}',
            "negative",
        ),
    ],
    ids=["huge-int-as-float", "argv-surrogate", "negative-pid", "negative-count"],
)
async def test_values_that_would_break_rendering_are_violations(
    answer: bytes, message: str
) -> None:
    client, task = await _connect(_after_request(frames.encode(1, Kind.RESP, answer)))
    call = client.metrics() if b"mem_total" in answer else client.list_procs()
    with pytest.raises(ProtocolError, match=message):
        await asyncio.wait_for(call, 5)
    task.cancel()
    await client.conn.close()


async def test_a_capture_keeps_each_streams_newest_bytes_up_to_its_limit() -> None:
    # A guest's flood must not fill the host's memory through a capturing exec: the result
    # holds the newest `capture_limit` bytes of each stream and says how many it left out;
    # the callbacks still see every byte, in order.
    out = b"".join(i.to_bytes(4, "big") for i in range(50_000))  # 200 kB, each byte placed
    err = b"E" * 900

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        f = await _read_frame(r)
        for i in range(0, len(out), 3000):
            w.write(frames.encode(f.chan, Kind.OUT, out[i : i + 3000]))
        w.write(frames.encode(f.chan, Kind.ERR, err))
        w.write(frames.encode_json(f.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(30)

    client, task = await _connect(guest)
    seen: list[bytes] = []
    result = await asyncio.wait_for(
        client.exec("flood", capture_limit=10_001, on_stdout=seen.append), 5
    )
    assert b"".join(seen) == out
    assert result.stdout == out[-10_001:] and result.stdout_dropped == len(out) - 10_001
    assert result.stderr == err and result.stderr_dropped == 0
    task.cancel()
    await client.conn.close()


async def test_the_exec_deadline_is_pushed_back_by_a_callback_that_stalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A guest that sends as fast as its credit allows, to a caller whose callback stalls
    # once past the timeout and its grace (a slow HTTP client): the guest did nothing late,
    # so the exec must finish rather than fail as unresponsive (and be cancelled).
    monkeypatch.setattr(client_mod, "EXEC_DEADLINE_GRACE_S", 0.3)
    total = 1 << 20

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await _read_frame(r)
        window, sent = mux.WINDOW, 0
        while sent < total:
            while window <= 0:
                f = await _read_frame(r)
                assert f.kind is Kind.CREDIT, f"the host sent {f.kind.name}"
                window += f.credit()
            n = min(32759, window, total - sent)
            w.write(frames.encode(req.chan, Kind.OUT, b"x" * n))
            await w.drain()
            window, sent = window - n, sent + n
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await _connect(guest)
    got = 0

    async def stalls_once(b: bytes) -> None:
        nonlocal got
        got += len(b)
        if got == len(b):
            await asyncio.sleep(0.8)  # past the 0.1 s timeout and its grace

    result = await asyncio.wait_for(
        client.exec("cat big", timeout=0.1, on_stdout=stalls_once, capture=False), 10
    )
    assert (result.exit_code, got) == (0, total)
    task.cancel()
    await client.conn.close()


async def test_a_flood_of_empty_frames_lets_the_event_loop_run_between_slices() -> None:
    # 100,000 empty OUT frames (they say nothing and cost no credit) arrive faster than the
    # host takes them: the reader must let other tasks (other sandboxes) run between slices
    # instead of handling every frame it has buffered in one go.
    count = 100_000

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await _read_frame(r)
        w.write(frames.encode(req.chan, Kind.OUT, b"") * count)
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await _connect(guest)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(ticker())
    result = await asyncio.wait_for(client.exec("flood"), 30)
    other.cancel()
    assert result.exit_code == 0
    assert ticks >= count // (mux.DISPATCH_BUDGET // mux.FRAME_COST) // 2, ticks
    task.cancel()
    await client.conn.close()


async def test_events_slow_to_decode_let_the_event_loop_run_between_them() -> None:
    # Bytes do not measure JSON's cost: 32 KiB of `[{},{},...]` takes ~6 ms to decode
    # strictly (a string's 32 KiB, ~0.1). Counted in bytes, the reader took every such
    # event it had buffered per turn and the exec consumer its whole backlog: one guest held
    # every other sandbox of the daemon ~200 ms at a time. Both now take turns by the time
    # they ran. (As many as a channel holds: the reader no longer decodes them, the consumer
    # does, one a turn.)
    events = 25
    payload = b'{"event":"x","e":[' + b",".join([b"{}"] * 10_900) + b"]}"
    decode_s = min(timeit.repeat(lambda: frames.decode_json(payload), number=1, repeat=5))

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await _read_frame(r)
        w.write(frames.encode(req.chan, Kind.EVENT, payload) * events)
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "exit_code": 0}))
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await _connect(guest)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    other = asyncio.create_task(ticker())
    result = await asyncio.wait_for(client.exec("flood"), 60)
    other.cancel()
    assert result.exit_code == 0
    # the median turn, not the longest: a loaded machine may stop this process any time
    turn = statistics.median(gaps)
    # (a turn of the reader's and one of the consumer's, each a slice and one event, and
    # slack; before, 8 events each)
    assert turn < 3 * (mux.DISPATCH_SLICE_S + decode_s), (turn, decode_s, len(gaps))
    task.cancel()
    await client.conn.close()


async def test_queued_events_hold_about_their_bytes_not_their_decoded_size() -> None:
    # The event bounds count bytes; a queued event kept decoded would hold many times that
    # (`[[],[],...]`: 3 bytes each, a 56-byte list each decoded).
    payload = b'{"e":[' + b",".join([b"[]"] * 10_900) + b"]}"
    per_channel = mux.EVENT_BACKLOG // (len(payload) + mux.EVENT_OVERHEAD)
    channels = 4

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        opened = [(await _read_frame(r)).chan for _ in range(channels)]
        for chan in opened:
            w.write(frames.encode(chan, Kind.EVENT, payload) * per_channel)
        await w.drain()
        await asyncio.sleep(3600)

    client, task = await _connect(guest)
    conn = client.conn
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(channels):
            await conn.request(conn.open_channel(), {"op": "watch"})
        want = channels * per_channel * (len(payload) + mux.EVENT_OVERHEAD)
        for _ in range(500):
            if conn._event_bytes >= want:
                break
            await asyncio.sleep(0.01)
        assert conn._event_bytes == want
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 2 * want, f"{held / 2**20:.1f} MiB held for {want / 2**20:.1f} MiB of events"
    task.cancel()
    await conn.close()


async def test_a_capture_limit_that_keeps_nothing_is_refused_before_anything_runs() -> None:
    asked = asyncio.Event()

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_frame(r)
        asked.set()

    client, task = await _connect(guest)
    with pytest.raises(ValueError, match="capture_limit"):
        await client.exec("true", capture_limit=0)
    await asyncio.sleep(0.1)
    assert not asked.is_set()
    task.cancel()
    await client.conn.close()


@pytest.mark.parametrize("code", ["unresponsive", "x" * 30_000, "no_such_code"])
async def test_a_guest_cannot_choose_an_error_code_outside_the_protocol(code: str) -> None:
    # The code picks the API's status: a guest's "unresponsive" was a 504 the host's own
    # silence detection seems to give, and a 60,000-character code went out as the API's.
    answer = frames.encode_json(1, Kind.RESP, {"ok": False, "code": code, "error": "said"})
    client, task = await _connect(_after_request(answer))
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(client.stat("/x"), 5)
    assert (err.value.code, str(err.value)) == ("internal", "said")
    task.cancel()
    await client.conn.close()
