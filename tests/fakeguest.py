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


async def answer_hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    f = await read_frame(r)
    assert f.kind is Kind.REQ and f.json()["op"] == "hello"
    w.write(frames.encode_json(0, Kind.RESP, {"ok": True, "nonce": f.json()["nonce"]}))
    await w.drain()


async def connect(guest: Guest) -> tuple[AgentClient, asyncio.Task[None]]:
    """A client connected to `guest`, which runs (after answering hello) in the task."""
    host_sock, guest_sock = socket.socketpair()
    gr, gw = await asyncio.open_connection(sock=guest_sock)

    async def run_guest() -> None:
        await answer_hello(gr, gw)
        await guest(gr, gw)

    task = asyncio.create_task(run_guest())
    hr, hw = await asyncio.open_connection(sock=host_sock)
    conn = AgentConnection(hr, hw)
    await conn.handshake(5)
    return AgentClient(conn), task
