"""An honest guest's long listings arrive whole however fast it sends them.

The guest here runs in its own thread, as a real one runs on its own vCPU, and writes its
batches (sized as the agent's are) as fast as the socket takes them: the host must keep up
with listings within its own bounds instead of cancelling them as a slow consumer."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from isorun.agent import AgentClient, AgentConnection, frames
from isorun.agent.frames import Kind

# guest/agent/internal/agent/files_tree.go: an EVENT's batch fits one 32 KiB frame
BATCH_BYTES = 32 * 1024 - 9 - 256
# What the guest sends for one REQ: its frames, in order.
Answer = Callable[[frames.Frame], list[bytes]]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _recv_frame(sock: socket.socket) -> frames.Frame:
    length, chan, kind = frames.HEADER.unpack(_recv_exactly(sock, frames.HEADER_SIZE))
    return frames.Frame(chan, Kind(kind), _recv_exactly(sock, length))


def _batches(items: list[dict[str, object]]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for item in items:
        text = json.dumps(item, separators=(",", ":"))
        if batch and size + len(text) + 1 > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text) + 1
    if batch:
        yield batch


def _serve(sock: socket.socket, answer: Answer) -> None:
    """Say hello, then answer each REQ with the frames `answer` makes, written one by one
    as fast as the socket takes them."""
    hello = _recv_frame(sock)
    sock.sendall(frames.encode_json(0, Kind.RESP, {"ok": True, "nonce": hello.json()["nonce"]}))
    try:
        while True:
            req = _recv_frame(sock)
            if req.kind is Kind.REQ:
                for frame in answer(req):
                    sock.sendall(frame)
    except (EOFError, OSError):
        pass


@pytest.fixture
def threaded_guest() -> Iterator[Callable[[Answer], socket.socket]]:
    """Starts a guest thread answering with `answer`; gives the host's socket to it."""
    threads: list[tuple[threading.Thread, socket.socket]] = []

    def start(answer: Answer) -> socket.socket:
        host_sock, guest_sock = socket.socketpair()
        t = threading.Thread(target=_serve, args=(guest_sock, answer), daemon=True)
        t.start()
        threads.append((t, guest_sock))
        return host_sock

    yield start
    for t, guest_sock in threads:
        guest_sock.shutdown(socket.SHUT_RDWR)
        t.join(10)
        guest_sock.close()


async def _client(host_sock: socket.socket) -> AgentClient:
    r, w = await asyncio.open_connection(sock=host_sock, limit=4 * frames.MAX_PAYLOAD)
    conn = AgentConnection(r, w)
    conn.keepalive_s = 0
    await conn.handshake(5)
    return AgentClient(conn)


@pytest.fixture
async def closing() -> AsyncIterator[list[AgentClient]]:
    clients: list[AgentClient] = []
    yield clients
    for c in clients:
        await c.conn.close()


def _entry(i: int) -> dict[str, object]:
    name = f"file{i:06d}.txt"
    return {"name": name, "path": f"/data/{name}", "type": "file", "size": i, "mode": 0o644}


async def test_a_listing_of_60000_entries_sent_at_full_speed_arrives_whole(
    threaded_guest: Callable[[Answer], socket.socket],
    closing: list[AgentClient],
) -> None:
    # ~5 MiB of events, well within the listing's bounds (100,000 entries, 64 MiB): the
    # host used to queue them for its consumer, which is slower than the guest, and cancel
    # the listing as "too slow" past 1 MiB of backlog (from ~20,000 entries).
    count = 60_000
    entries = [_entry(i) for i in reversed(range(count))]  # the guest's order is not sorted

    def answer(req: frames.Frame) -> list[bytes]:
        assert req.json()["op"] == "list"
        events = [
            frames.encode(
                req.chan,
                Kind.EVENT,
                ('{"event":"entries","entries":[' + ",".join(b) + "]}").encode(),
            )
            for b in _batches(entries)
        ]
        return [*events, frames.encode_json(req.chan, Kind.RESP, {"ok": True, "count": count})]

    client = await _client(threaded_guest(answer))
    closing.append(client)
    listed = await asyncio.wait_for(client.list("/data"), 60)
    assert [e.path for e in listed] == [f"/data/file{i:06d}.txt" for i in range(count)]
    assert listed[123].size == 123
    assert (await asyncio.wait_for(client.list("/data"), 60))[-1].name == "file059999.txt"
