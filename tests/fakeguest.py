"""A scripted guest agent on the other end of a socketpair, for tests of the host side
against a guest that misbehaves on purpose (the real agent never does these things)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from isorun.agent import AgentClient, AgentConnection, frames
from isorun.agent.frames import Kind

Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_frame(r: asyncio.StreamReader) -> frames.Frame:
    hdr = await r.readexactly(frames.HEADER_SIZE)
    length, chan, kind = frames.HEADER.unpack(hdr)
    return frames.Frame(chan, Kind(kind), await r.readexactly(length))


async def answer_hello(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, features: list[str] | None = None
) -> None:
    f = await read_frame(r)
    assert f.kind is Kind.REQ and f.json()["op"] == "hello"
    answer: dict[str, object] = {"ok": True, "nonce": f.json()["nonce"]}
    if features is not None:
        answer["features"] = features
    w.write(frames.encode_json(0, Kind.RESP, answer))
    await w.drain()


async def connect(
    guest: Guest,
    *,
    keepalive_ms: int | None = None,
    idle_after_s: float | None = None,
    features: list[str] | None = None,
    host_sndbuf: int | None = None,
) -> tuple[AgentClient, asyncio.Task[None]]:
    """A client connected to `guest`, which runs (after answering hello) in the task.
    With `keepalive_ms` the fake first grants the host's keepalive request that interval
    (and `idle_after_s` is how long the host then lets a request hear nothing); without,
    the host asks for none and the guest's first frame is the test's own request. The
    hello names `features` when given (an agent from before features names none).
    `host_sndbuf` shrinks the host socket's send buffer: what the guest does not read then
    waits in the host's own buffer after a few KiB instead of hundreds."""
    host_sock, guest_sock = socket.socketpair()
    if host_sndbuf is not None:
        host_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, host_sndbuf)
    gr, gw = await asyncio.open_connection(sock=guest_sock)

    async def run_guest() -> None:
        await answer_hello(gr, gw, features)
        if keepalive_ms is not None:
            ask = await read_frame(gr)
            assert ask.kind is Kind.REQ and ask.json()["op"] == "keepalive"
            gw.write(
                frames.encode_json(ask.chan, Kind.RESP, {"ok": True, "interval_ms": keepalive_ms})
            )
            await gw.drain()
        await guest(gr, gw)

    task = asyncio.create_task(run_guest())
    hr, hw = await asyncio.open_connection(sock=host_sock)
    conn = AgentConnection(hr, hw)
    if idle_after_s is not None:
        conn.idle_after_s = idle_after_s
    if keepalive_ms is None:
        conn.keepalive_s = 0
    await conn.handshake(5)
    if conn._keepalive_task is not None:
        await conn._keepalive_task  # granted before the test's requests go out
    return AgentClient(conn), task
