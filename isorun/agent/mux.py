"""Multiplexed, flow-controlled channels over one agent byte stream.

One reader task parses frames from the guest and routes them to channels. Data from
the guest is credit-limited per channel (docs/protocol.md "Flow control"); anything the
guest sends outside the contract closes the whole connection with a ProtocolError and
fails every open channel, never the process that hosts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from typing import Any

from isorun.agent import frames
from isorun.agent.frames import Frame, Kind
from isorun.errors import ChannelClosedError, ProtocolError

WINDOW = 262144
# Return credit once a quarter of the window has been consumed: fewer tiny frames.
CREDIT_BATCH = WINDOW // 4
# Control events (JSON) are not credit-limited; a full queue pauses the reader instead,
# which back-pressures the guest through the transport.
QUEUE_FRAMES = 512
HELLO_SCAN_LIMIT = 1 << 20
# asyncio's buffer limit for an agent stream: a few whole frames.
STREAM_LIMIT = frames.MAX_PAYLOAD * 4
StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
IO_CHUNK = 32768


class Channel:
    """One request's frames. Consumers call `next()` until a RESP arrives."""

    def __init__(self, conn: AgentConnection, chan: int) -> None:
        self._conn = conn
        self.id = chan
        self._queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue(QUEUE_FRAMES)
        self._recv_window = WINDOW  # data bytes the guest may still send us
        self._unacked = 0
        self._send_window = WINDOW  # data bytes we may still send the guest
        self._send_ready = asyncio.Event()
        self._send_ready.set()
        self._all_acked = asyncio.Event()  # every byte we sent was consumed by the guest
        self._all_acked.set()
        self.closed = False
        # The consumer is gone (cancelled, failed): the reader drops this channel's frames
        # instead of queueing them for no one, and forgets the channel at its RESP.
        self._abandoned = False

    async def _deliver(self, frame: Frame | BaseException) -> None:
        if isinstance(frame, Frame) and frame.kind in frames.DATA_KINDS:
            self._recv_window -= len(frame.payload)
            if self._recv_window < 0:
                raise ProtocolError(f"guest overran the flow-control window on channel {self.id}")
        if self._abandoned:
            if isinstance(frame, Frame) and frame.kind is Kind.RESP:
                self._conn._forget(self.id)
            return
        await self._queue.put(frame)

    def _grant(self, n: int) -> None:
        self._send_window += n
        if self._send_window > 0:
            self._send_ready.set()
        if self._send_window >= WINDOW:
            self._all_acked.set()

    async def next(self) -> Frame:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            # A dead connection ends the channel; a local failure (see `fail`) leaves it for
            # the consumer to abandon, which cancels the request in the guest.
            self.closed = self.closed or self._conn.is_closed
            raise item
        if item.kind in frames.DATA_KINDS:
            await self._consumed(len(item.payload))
        elif item.kind is Kind.RESP:
            self.closed = True
            self._conn._forget(self.id)
        return item

    async def _consumed(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= CREDIT_BATCH:
            grant, self._unacked = self._unacked, 0
            self._recv_window += grant
            await self._conn._send(frames.encode_credit(self.id, grant))

    async def send_data(self, data: bytes) -> None:
        """Send IN bytes, waiting for the guest's credit as needed."""
        view = memoryview(data)
        while view:
            while self._send_window <= 0:
                self._send_ready.clear()
                await self._wait_or_closed(self._send_ready.wait())
            n = min(len(view), self._send_window, IO_CHUNK)
            self._send_window -= n
            self._all_acked.clear()
            await self._conn._send(frames.encode(self.id, Kind.IN, bytes(view[:n])))
            view = view[n:]

    async def _wait_or_closed(self, aw: Awaitable[Any]) -> None:
        waiter = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._conn.wait_closed())
        try:
            await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, closed):
                if not t.done():
                    t.cancel()
        if not waiter.done() or waiter.cancelled():
            raise self._conn.closed_error()

    async def wait_acked(self) -> None:
        """Wait until the guest has consumed (credited back) every byte sent so far: for
        stdin, that it was written into the process's pipe."""
        if not self._all_acked.is_set():
            await self._wait_or_closed(self._all_acked.wait())
        if self._send_window < WINDOW:  # woken by the connection closing, not by credit
            raise self._conn.closed_error()

    async def send_eof(self) -> None:
        await self._conn._send(frames.encode(self.id, Kind.EOF))

    def fail(self, exc: BaseException) -> None:
        """End the consumer's wait with `exc` (its own stdin source failed, say)."""
        if not self.closed:
            _put_dropping(self._queue, exc)

    def abandon(self) -> None:
        """Give up on the request without waiting: send CANCEL, and from now on drop what
        the guest still sends on the channel (until its RESP, which ends it). Never blocks,
        so it is safe in cancellation and error paths even when the guest stopped reading."""
        if self.closed:
            return
        self.closed = True
        self._abandoned = True
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Frame) and item.kind is Kind.RESP:
                self._conn._forget(self.id)
                return  # answered already: nothing to cancel
        self._conn._send_nowait(frames.encode(self.id, Kind.CANCEL))

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Leaving the block ends the request: abandoned unless its RESP came."""
        self.abandon()


class AgentConnection:
    """The host end of one agent stream: a unix socket to QEMU's virtio-serial chardev,
    or a vsock connection straight to the guest."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = frames.FrameDecoder()
        self._channels: dict[int, Channel] = {}
        self._next_chan = 1
        self._write_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_error: BaseException | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}

    @classmethod
    async def open_unix(cls, path: str, timeout: float = 10.0) -> AgentConnection:
        connect = asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        return await cls.open(connect, f"the agent socket {path}", timeout)

    @classmethod
    async def open(
        cls, connect: Awaitable[StreamPair], what: str, timeout: float = 10.0
    ) -> AgentConnection:
        """Connect through `connect` (an agent stream of any transport), then say hello;
        each step within `timeout`. `what` names the endpoint in errors."""
        try:
            reader, writer = await asyncio.wait_for(connect, timeout)
        except OSError as exc:
            raise ChannelClosedError(f"cannot connect to {what}: {exc}") from exc
        conn = cls(reader, writer)
        try:
            await conn.handshake(timeout)
        except TimeoutError:
            writer.close()
            raise
        except OSError as exc:
            writer.close()
            raise ChannelClosedError(f"agent stream failed during hello: {exc}") from exc
        except BaseException:
            writer.close()
            raise
        return conn

    async def handshake(self, timeout: float) -> dict[str, Any]:
        """Say hello and skip whatever an earlier connection left in the stream."""
        nonce = os.urandom(12).hex()
        await self._send(
            frames.encode_json(frames.HELLO_CHAN, Kind.REQ, {"op": "hello", "nonce": nonce})
        )
        buf = b""
        async with asyncio.timeout(timeout):
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise ChannelClosedError("agent stream closed during hello")
                buf = (buf + data)[-HELLO_SCAN_LIMIT:]
                found = frames.find_hello(buf, nonce)
                if found is not None:
                    break
        self.hello, end = found
        self._reader_task = asyncio.create_task(self._read_loop(buf[end:]), name="agent-reader")
        return self.hello

    # --- channel management -------------------------------------------------------

    def open_channel(self) -> Channel:
        self._raise_if_closed()
        chan = self._next_chan
        self._next_chan = 1 if self._next_chan >= 0xFFFFFFFF else self._next_chan + 1
        ch = Channel(self, chan)
        self._channels[chan] = ch
        return ch

    async def request(self, ch: Channel, req: dict[str, Any]) -> None:
        await self._send(frames.encode_json(ch.id, Kind.REQ, req))

    def _forget(self, chan: int) -> None:
        self._channels.pop(chan, None)

    # --- I/O ------------------------------------------------------------------------

    def _send_nowait(self, data: bytes) -> None:
        """Queue one whole frame on the transport without waiting for it to drain. Frames
        are written whole, so this never interleaves with a sender holding the lock."""
        if not self._closed.is_set() and not self._writer.transport.is_closing():
            self._writer.write(data)

    async def _send(self, data: bytes) -> None:
        self._raise_if_closed()
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._fail(ChannelClosedError(f"agent stream write failed: {exc}"))
                raise self.closed_error() from exc

    async def _read_loop(self, leftover: bytes) -> None:
        try:
            if leftover:
                await self._dispatch_all(self._decoder.feed(leftover))
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise ChannelClosedError("agent stream closed by the guest side")
                await self._dispatch_all(self._decoder.feed(data))
        except asyncio.CancelledError:
            self._fail(ChannelClosedError("agent connection closed by the host"))
            raise
        except (ProtocolError, ChannelClosedError) as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(ChannelClosedError(f"agent stream failed: {exc}"))

    async def _dispatch_all(self, batch: list[Frame]) -> None:
        for frame in batch:
            ch = self._channels.get(frame.chan)
            if ch is None:
                raise ProtocolError(
                    f"guest sent a {frame.kind.name} frame on channel {frame.chan}, "
                    "which the host never opened"
                )
            if frame.kind is Kind.CREDIT:
                ch._grant(frame.credit())
                continue
            if frame.kind in (Kind.RESP, Kind.EVENT):
                frame.json()  # validate now: a bad payload is the guest's fault, not the consumer's
            await ch._deliver(frame)

    # --- closing -----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def closed_error(self) -> BaseException:
        return self._close_error or ChannelClosedError("agent connection is closed")

    def _raise_if_closed(self) -> None:
        if self._closed.is_set():
            raise self.closed_error()

    def explain_close(self, exc: BaseException) -> None:
        """Close with `exc`, or replace a vaguer reason once the real cause is known."""
        if self._closed.is_set():
            self._close_error = exc
        else:
            self._fail(exc)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _fail(self, exc: BaseException) -> None:
        if self._closed.is_set():
            return
        self._close_error = exc
        self._closed.set()
        # Abort, not close: close() waits to flush what is buffered, and a guest that stopped
        # reading never lets it, so wait_closed() and every sender blocked in drain() would
        # hang for good. Nothing buffered matters any more: the guest drops every channel of
        # a connection that ends.
        self._writer.transport.abort()
        for ch in list(self._channels.values()):
            _put_dropping(ch._queue, exc)
            ch._send_ready.set()
            ch._all_acked.set()
        self._channels.clear()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._fail(ChannelClosedError("agent connection closed by the host"))
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def _put_dropping(queue: asyncio.Queue[Frame | BaseException], exc: BaseException) -> None:
    """Queue an error without blocking: drop a pending item to make room for it."""
    while True:
        try:
            queue.put_nowait(exc)
            return
        except asyncio.QueueFull:
            queue.get_nowait()
