"""A request that hears nothing from the guest, not even the agent's keepalive, fails as
unresponsive; one the guest is still working on, saying so with keepalives, does not;
keepalives never reach the request's consumer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import pytest
from fakeguest import Guest, answer_hello, connect, read_frame

from isorun.agent import AgentClient, AgentConnection, frames
from isorun.agent.frames import Kind
from isorun.agent.mux import KEEPALIVE_PAYLOAD
from isorun.errors import GuestError

# Short for a quick suite, yet past any stall of the event loop on a busy machine: a
# keepalive sent in time but read after a longer stall would count as late.
IDLE = 1.0


async def _answering_all(
    guest: Guest, host_sndbuf: int | None = None
) -> tuple[AgentConnection, asyncio.Task[None]]:
    """A connection (idle limit IDLE) to `guest`, which after its hello handles all that
    comes, the host's keepalive request too (fakeguest.connect answers that for a guest).
    `host_sndbuf` shrinks the host socket's send buffer (fakeguest.connect's)."""
    host_sock, guest_sock = socket.socketpair()
    if host_sndbuf is not None:
        host_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, host_sndbuf)
    gr, gw = await asyncio.open_connection(sock=guest_sock)

    async def run() -> None:
        await answer_hello(gr, gw)
        await guest(gr, gw)

    task = asyncio.create_task(run())
    hr, hw = await asyncio.open_connection(sock=host_sock)
    conn = AgentConnection(hr, hw)
    conn.idle_after_s = IDLE
    await conn.handshake(5)
    return conn, task


async def test_a_request_the_hung_guest_never_answers_fails_as_unresponsive() -> None:
    cancelled = asyncio.Event()

    async def hung(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)  # and never answer, nor send a keepalive
        while (f := await read_frame(r)).chan != req.chan or f.kind is not Kind.CANCEL:
            pass
        cancelled.set()
        await asyncio.sleep(3600)

    client, guest = await connect(hung, keepalive_ms=100, idle_after_s=IDLE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(client.stat("/etc"), 10)
    waited = loop.time() - started
    assert err.value.code == "unresponsive"
    assert f"sent nothing on this request for {IDLE:g} s" in str(err.value)
    assert IDLE <= waited < IDLE + 2
    await asyncio.wait_for(cancelled.wait(), 5)  # the request is abandoned in the guest
    assert not client.conn.is_closed  # the sandbox's other requests go on
    guest.cancel()
    await client.conn.close()


async def test_keepalives_hold_a_long_request_open_and_stay_out_of_its_answer() -> None:
    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)
        for _ in range(round(30 * IDLE)):  # work for three times the idle limit
            w.write(frames.encode(req.chan, Kind.EVENT, KEEPALIVE_PAYLOAD))
            await w.drain()
            await asyncio.sleep(0.1)
        entry = {"name": "a", "path": "/d/a", "type": "file", "size": 1, "mode": 0o644}
        w.write(frames.encode_json(req.chan, Kind.EVENT, {"event": "entries", "entries": [entry]}))
        w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True}))
        await w.drain()
        await asyncio.sleep(3600)

    client, guest = await connect(slow, keepalive_ms=100, idle_after_s=IDLE)
    entries = await asyncio.wait_for(client.list("/d"), 10)
    assert [e.path for e in entries] == ["/d/a"]
    guest.cancel()
    await client.conn.close()


def _slow_without_keepalive(answered: asyncio.Event) -> Guest:
    """An agent that sends no keepalive but answers every request (the host's `health`
    probes at once, the others 3 * IDLE late) and none of these too."""

    async def agent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def answer_late(chan: int) -> None:
            await asyncio.sleep(3 * IDLE)
            w.write(frames.encode_json(chan, Kind.RESP, {"ok": True}))
            answered.set()

        late: set[asyncio.Task[None]] = set()
        while True:
            req = await read_frame(r)
            if req.kind is not Kind.REQ:
                continue
            if req.json()["op"] == "health":
                w.write(frames.encode_json(req.chan, Kind.RESP, {"ok": True, "procs": 0}))
            else:
                late.add(asyncio.create_task(answer_late(req.chan)))

    return agent


async def test_an_agent_that_grants_no_keepalive_is_probed_not_timed_out() -> None:
    answered = asyncio.Event()
    # it answers the host's keepalive request with interval 0: it will send none
    client, guest = await connect(
        _slow_without_keepalive(answered), keepalive_ms=0, idle_after_s=IDLE
    )
    assert client.conn.idle_timeout == IDLE  # its answers to `health` vouch for it
    await asyncio.wait_for(client.mkdir("/x"), 10)
    assert answered.is_set()
    guest.cancel()
    await client.conn.close()


def _refused(chan: int) -> list[bytes]:  # as an old agent would
    answer = {"ok": False, "code": "invalid", "error": 'unknown op "keepalive"'}
    return [frames.encode_json(chan, Kind.RESP, answer)]


def _granted_none(chan: int) -> list[bytes]:
    return [frames.encode_json(chan, Kind.RESP, {"ok": True, "interval_ms": 0})]


def _flooded(chan: int) -> list[bytes]:
    # events dear to decode (each "," counts) and no answer: the request's channel fails as
    # too slow a consumer, which once left every request untimed
    return [frames.encode_json(chan, Kind.EVENT, {"event": "x", "a": [0] * 16000})] * 60


@pytest.mark.parametrize("misanswer", [_refused, _granted_none, _flooded])
async def test_a_guest_that_grants_no_keepalive_cannot_make_requests_wait_for_ever(
    misanswer: Callable[[int], list[bytes]],
) -> None:
    # Root in the guest misanswers the keepalive request, then answers nothing: its
    # requests still fail as unresponsive.
    async def hostile(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ask = await read_frame(r)
        w.writelines(misanswer(ask.chan))
        await w.drain()
        while True:
            await read_frame(r)  # reads everything, answers nothing

    conn, guest = await _answering_all(hostile)
    assert conn._keepalive_task is not None
    await asyncio.wait_for(conn._keepalive_task, 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(AgentClient(conn).stat("/x"), 10)
    assert err.value.code == "unresponsive"
    assert IDLE <= loop.time() - started < IDLE + 2
    assert not conn.is_closed  # the sandbox's other requests go on
    guest.cancel()
    await conn.close()


async def test_the_idle_limit_follows_the_keepalive_the_agent_granted() -> None:
    async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    # an agent that rounded our ask up to 1 s gets three of its intervals, at least
    client, guest = await connect(idle, keepalive_ms=1000, idle_after_s=IDLE)
    assert client.conn.idle_timeout == 3.0
    guest.cancel()
    await client.conn.close()


async def test_an_agent_from_before_keepalives_is_asked_and_still_works() -> None:
    """Such an agent refuses the unknown op; the host then expects no keepalive, and asks
    `health` instead while requests wait."""
    asked = asyncio.Event()

    async def old_agent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            req = await read_frame(r)
            if req.kind is not Kind.REQ:
                continue
            op = req.json()["op"]
            if op == "keepalive":
                answer = {"ok": False, "code": "invalid", "error": 'unknown op "keepalive"'}
                asked.set()
            else:
                entry = {"name": "x", "path": "/x", "type": "dir", "size": 0, "mode": 0o755}
                answer = {"ok": True, "entry": entry}
            w.write(frames.encode_json(req.chan, Kind.RESP, answer))
            await w.drain()

    conn, guest = await _answering_all(old_agent)
    client = AgentClient(conn)
    assert (await asyncio.wait_for(client.stat("/x"), 5)).path == "/x"
    await asyncio.wait_for(asked.wait(), 5)
    await asyncio.sleep(0.1)
    assert conn.idle_timeout == IDLE and not conn.is_closed
    guest.cancel()
    await conn.close()


def _start_uploads(client: AgentClient) -> list[asyncio.Task[int]]:
    """Two 4 MiB uploads: more than the stream buffers hold, so a guest that stopped
    reading backs up every later send."""
    return [asyncio.create_task(client.write_file(f"/up{i}", b"u" * (4 << 20))) for i in range(2)]


async def _all_unresponsive(tasks: list[asyncio.Task[int]]) -> None:
    for task in tasks:
        with pytest.raises(GuestError) as err:
            await asyncio.wait_for(task, 3 * IDLE + 5)
        assert err.value.code == "unresponsive"


async def test_a_send_the_hung_guest_never_reads_fails_and_takes_no_one_with_it() -> None:
    """A guest that stops reading: uploads fill the stream; a request queued behind them
    fails as unresponsive instead of waiting for the stream to drain for ever, and taking
    data already received (which sends credit back) does not hang either."""
    got_out = asyncio.Event()

    async def stops_reading(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r)  # a read_file: answer with a window's worth, then hang
        for _ in range(16):
            w.write(frames.encode(req.chan, Kind.OUT, b"x" * 16384))
        await w.drain()
        got_out.set()
        await asyncio.sleep(3600)  # never reads again, never answers

    client, guest = await connect(stops_reading, keepalive_ms=100, idle_after_s=IDLE)
    reading = client.read_file("/big")
    first = await asyncio.wait_for(reading.__anext__(), 5)
    await got_out.wait()
    uploads = _start_uploads(client)
    taken = len(first)
    with pytest.raises(GuestError) as err:  # taking the rest sends credits: must not hang
        async for chunk in reading:
            taken += len(chunk)
    assert err.value.code == "unresponsive" and taken == 16 * 16384
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(client.stat("/etc"), 3 * IDLE + 5)
    assert err.value.code == "unresponsive"
    await _all_unresponsive(uploads)
    guest.cancel()
    await client.conn.close()


async def test_a_request_whose_send_timed_out_is_cancelled_when_the_guest_reads_again() -> None:
    """Its REQ may sit whole in the stream's buffer: when the guest reads again it must find
    a CANCEL after it, not run a command its caller was told had failed."""
    resume = asyncio.Event()
    reqs: list[int] = []
    cancels: list[int] = []

    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await resume.wait()
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            while True:
                f = await asyncio.wait_for(read_frame(r), 1)
                if f.kind is Kind.REQ:
                    reqs.append(f.chan)
                elif f.kind is Kind.CANCEL and f.chan in reqs:
                    cancels.append(f.chan)

    client, guest = await connect(stalls, keepalive_ms=100, idle_after_s=IDLE)
    uploads = _start_uploads(client)
    await asyncio.sleep(0.1)
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(client.exec("touch /ran"), 3 * IDLE + 5)
    assert err.value.code == "unresponsive"
    await _all_unresponsive(uploads)
    resume.set()
    await asyncio.wait_for(guest, 30)
    assert len(reqs) == 3, reqs  # the exec's REQ did reach the guest ...
    assert sorted(cancels) == sorted(reqs)  # ... and so did a CANCEL for it
    await client.conn.close()


async def test_a_wait_begun_before_keepalives_were_granted_is_timed_too() -> None:
    async def grants_late(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        asks = [await read_frame(r), await read_frame(r)]  # the keepalive and the watch
        await asyncio.sleep(0.3)  # the watch is waiting by now
        ask = next(f for f in asks if f.json()["op"] == "keepalive")
        w.write(frames.encode_json(ask.chan, Kind.RESP, {"ok": True, "interval_ms": 100}))
        await w.drain()
        await asyncio.sleep(3600)  # then hangs: no keepalive, no answer

    conn, guest = await _answering_all(grants_late)
    watching = AgentClient(conn).watch("/w")
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(watching.__anext__(), 5)
    assert err.value.code == "unresponsive"
    guest.cancel()
    await conn.close()


async def test_a_guest_hung_since_its_hello_is_timed_without_a_keepalive_answer() -> None:
    # Every agent answers every op (an unknown one with ok:false): one that does not answer
    # the keepalive request at all is hung, and its requests fail instead of waiting for ever.
    async def hung_after_hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_frame(r)  # reads everything, answers nothing

    conn, guest = await _answering_all(hung_after_hello)
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(AgentClient(conn).health(), 10)
    assert err.value.code == "unresponsive"
    guest.cancel()
    await conn.close()


async def test_sends_begun_before_a_guest_hung_since_its_hello_was_timed_are_timed_too() -> None:
    # Right after hello nothing is timed yet (the keepalive's answer sets the limit). A send
    # begun then, and one queued behind it, used to keep waiting for the stream for ever once
    # the limit was set: the first failed with its upload, the second then held the lock.
    async def hung_after_hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)  # reads nothing, answers nothing

    conn, guest = await _answering_all(hung_after_hello, host_sndbuf=4096)
    assert conn.idle_timeout is None  # not timed yet
    client = AgentClient(conn)
    uploads = _start_uploads(client)
    await asyncio.sleep(0.05)  # an upload holds the stream, waiting for the guest to read
    stat = asyncio.create_task(client.stat("/etc"))  # its REQ queues behind
    await _all_unresponsive(uploads)
    with pytest.raises(GuestError) as err:
        await asyncio.wait_for(stat, 3 * IDLE + 5)
    assert err.value.code == "unresponsive"
    guest.cancel()
    await conn.close()


@pytest.mark.parametrize(
    ("answer", "idle"),
    [
        ({"ok": True, "interval_ms": 1000}, 3.0),
        ({"ok": False, "code": "invalid", "error": "unknown op"}, IDLE),
    ],
    ids=["late-grant", "late-refusal"],
)
async def test_a_late_answer_to_the_keepalive_request_still_counts(
    answer: dict[str, object], idle: float
) -> None:
    # Past the idle limit requests are timed; a late grant then sets the interval it
    # grants, and a late refusal (an agent from before keepalives) keeps the idle limit
    # (the host then asks `health` instead).
    async def late(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ask = await read_frame(r)
        await asyncio.sleep(IDLE + 0.3)
        w.write(frames.encode_json(ask.chan, Kind.RESP, answer))
        await w.drain()
        await asyncio.sleep(3600)

    conn, guest = await _answering_all(late)
    assert conn._keepalive_task is not None
    await asyncio.wait_for(conn._keepalive_task, 5)
    assert conn.idle_timeout == idle
    guest.cancel()
    await conn.close()


async def test_a_close_in_the_cleanup_of_a_cancelled_task_still_closes() -> None:
    # `finally: await conn.close()` of a cancelled task, the keepalive request still
    # pending: the connection (reader, socket, channels) must not be left open.
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_frame(r)

    conn, guest = await _answering_all(silent)

    async def user() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await conn.close()

    task = asyncio.create_task(user())
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert conn.is_closed
    assert conn._reader_task is not None and conn._reader_task.done()
    guest.cancel()
