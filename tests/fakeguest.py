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
    r: asyncio.StreamReader, w: asyncio.StreamWriter, keepalive_ms: int | None = None
) -> None:
    """Answer the host's hello; with `keepalive_ms`, promise keepalives that often."""
    f = await read_frame(r)
    assert f.kind is Kind.REQ and f.json()["op"] == "hello"
    answer = {"ok": True, "nonce": f.json()["nonce"]}
    if keepalive_ms is not None:
        answer["keepalive_ms"] = keepalive_ms
    w.write(frames.encode_json(0, Kind.RESP, answer))
    await w.drain()


async def connect(
    guest: Guest, *, keepalive_ms: int | None = None, idle_after_s: float | None = None
) -> tuple[AgentClient, asyncio.Task[None]]:
    """A client connected to `guest`, which runs (after answering hello) in the task.
    `keepalive_ms` is what the fake promises in hello, `idle_after_s` how long the host
    lets a request hear nothing from it."""
    host_sock, guest_sock = socket.socketpair()
    gr, gw = await asyncio.open_connection(sock=guest_sock)

    async def run_guest() -> None:
        await answer_hello(gr, gw, keepalive_ms)
        await guest(gr, gw)

    task = asyncio.create_task(run_guest())
    hr, hw = await asyncio.open_connection(sock=host_sock)
    conn = AgentConnection(hr, hw)
    if idle_after_s is not None:
        conn.idle_after_s = idle_after_s
    await conn.handshake(5)
    return AgentClient(conn), task
