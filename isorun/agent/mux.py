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
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from isorun.agent import frames
from isorun.agent.frames import Frame, Kind
from isorun.errors import (
    ChannelClosedError,
    ConsumerTooSlowError,
    GuestError,
    IsorunError,
    ProtocolError,
)

WINDOW = 262144
# Return credit once a quarter of the window has been consumed: fewer tiny frames.
CREDIT_BATCH = WINDOW // 4
# The one reader never waits for a consumer (one slow consumer would stall every request
# of the sandbox). Data is bounded by the credit window; control events are not
# credit-limited, so the events a consumer has not taken yet are bounded here: past a
# channel's bound its request is cancelled with an error saying so; past the connection's,
# the unanswered requests holding the most are (Channel._deliver).
EVENT_BACKLOG = 1 << 20  # per channel
# What a channel that sheds events (Channel.sheds_events) has in place of those it dropped.
DROPPED_EVENT = b'{"event":"dropped"}'
CONNECTION_EVENT_BACKLOG = 8 << 20  # all channels of one connection together
EVENT_OVERHEAD = 128  # counted per event besides its payload: empty ones are not free
DROPPED_EVENT_COST = len(DROPPED_EVENT) + EVENT_OVERHEAD
HELLO_SCAN_LIMIT = 1 << 20
# asyncio's buffer limit for an agent stream: a few whole frames.
STREAM_LIMIT = frames.MAX_PAYLOAD * 4
StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
IO_CHUNK = 32768
# The reader lets the event loop run once it handled this much: a frame costs its payload
# and FRAME_COST, so the loop runs every 256 frames, or every MiB of payload.
DISPATCH_BUDGET = 1 << 20
FRAME_COST = DISPATCH_BUDGET // 256
# JSON decoded costs this more per value it may hold (frames.json_cost): bytes do not
# measure its cost (32 KiB of `[{},{},...]` takes ~5 ms to decode strictly, 50 times a
# string's), and one guest held every other sandbox of the daemon ~200 ms at a time. A
# budget is ~2,000 values, about what 256 frames take; one event over it is a turn alone.
# An event is decoded once: by the reader for a channel that sinks them, else by its
# consumer, which takes turns by the same measure as it empties a backlog.
JSON_VALUE_COST = DISPATCH_BUDGET // 2048
# ... or once it ran this long (a backstop: whatever the measure misses).
DISPATCH_SLICE_S = 0.005
MAX_JOINED = frames.MAX_PAYLOAD  # bytes one queued data item grows to
# Once connected the host asks the agent (op "keepalive") to send each open request this
# EVENT every KEEPALIVE_S (guest/agent/internal/agent/keepalive.go): a long command, a
# watch with nothing to report or a large remove says nothing else for a long time. The
# reader drops them.
KEEPALIVE_PAYLOAD = b'{"event":"alive"}'
KEEPALIVE_S = 5.0
# A request that hears nothing from the guest, keepalives included, for this long fails
# with GuestError "unresponsive" (a hung guest kernel or agent) instead of waiting for
# ever; so does a send the guest does not read for this long. Generous: a loaded host
# emulating the guest (TCG) can starve it for seconds, and the failed request is
# cancelled (a foreground command with it).
IDLE_AFTER_S = 60.0
# An agent that grants no keepalive (one from before them, or a hostile one claiming to be)
# is asked `health` every third of IDLE_AFTER_S while requests wait: its answer vouches for
# them as a keepalive would, so its requests are timed all the same.
PROBES_PER_IDLE = 3
# The host's frames a guest has not read yet, past what the socket itself holds. Credits
# and CANCELs are queued without waiting (taking data must not hang on a guest that stopped
# reading), so a guest that stops reading but keeps sending would grow them without end
# (a CREDIT per 64 KiB it sends). An honest guest cannot: without reading credits it sends
# at most a window per channel, so a few credits per open request wait, plus one frame of
# a sender. Past this the connection fails as unresponsive.
WRITE_BACKLOG = 1 << 20
# What the windows widened past WINDOW (Channel.widen: a download's) may add up to on one
# connection. Each lets the guest send that much ahead of its consumer, held here while the
# consumer stalls (a download whose HTTP client stopped reading): 256 such downloads held
# 514 MiB. Past it a channel keeps WINDOW, until widened ones end.
CONNECTION_WIDENED = 64 << 20


class _Data:
    """OUT or ERR bytes not taken yet. Frames of one kind that arrive while the consumer is
    behind join one item (up to a frame's size), so their number stays small however small
    the guest's frames are. stdout and stderr stay each in order; which of the two came
    first is kept only while the consumer keeps up (the guest reads them apart anyway)."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: Kind, data: bytes) -> None:
        self.kind = kind
        self.data = bytearray(data)


_Item = Frame | _Data | BaseException
# Takes an EVENT's decoded body and its payload's size (Channel.sink_events).
EventSink = Callable[[dict[str, Any], int], None]


class Channel:
    """One request's frames. Consumers call `next()` until a RESP arrives."""

    def __init__(self, conn: AgentConnection, chan: int) -> None:
        self._conn = conn
        self.id = chan
        self._inbox: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._event_bytes = 0  # events queued, as counted against EVENT_BACKLOG
        self._answered = False  # the RESP arrived
        self._recv_window = WINDOW  # data bytes the guest may still send us
        self._unacked = 0
        self._send_window = WINDOW  # data bytes we may still send the guest
        self._send_ready = asyncio.Event()
        self._send_ready.set()
        self._all_acked = asyncio.Event()  # every byte we sent was consumed by the guest
        self._all_acked.set()
        self.closed = False
        self._ran_since = 0.0  # when next() last let the event loop run (DISPATCH_SLICE_S)
        self._spent = 0  # what next() handled since (DISPATCH_BUDGET)
        # the last frame from the guest on this channel (or when its REQ was written)
        self._heard = asyncio.get_running_loop().time()
        self.timed = True  # its waits end at the connection's idle_timeout
        # A watch's events may be shed when its consumer falls behind: it is told so by one
        # DROPPED_EVENT in their place (a watch reports "overflow") instead of cancelled.
        self.sheds_events = False
        self._dropped_marker: Frame | None = None  # queued, not yet taken
        self._widened = 0  # its window past WINDOW (widen), counted on the connection
        self._event_sink: EventSink | None = None

    def _deliver(self, frame: Frame) -> int:
        """Queue a frame from the guest; never waits. Returns what decoding it cost (the
        reader's DISPATCH_BUDGET): nothing unless the channel sinks its events."""
        if self._answered:
            return 0  # nothing follows a RESP: what a guest sends after it is dropped
        if frame.kind is Kind.RESP:
            self._answered = True
        if frame.kind in frames.DATA_KINDS:
            self._recv_window -= len(frame.payload)
            if self._recv_window < 0:
                raise ProtocolError(f"guest overran the flow-control window on channel {self.id}")
            if frame.payload:  # an empty one says nothing
                self._queue_data(frame)
            return 0
        if frame.kind is Kind.EVENT and self._event_sink is not None:
            # a bad payload is the guest's fault: the connection's end
            self._sink(frame.json(), len(frame.payload))
            return frames.json_cost(frame.payload) * JSON_VALUE_COST
        if frame.kind is Kind.EVENT:
            cost = len(frame.payload) + EVENT_OVERHEAD
            if self._dropped_marker is not None:
                return 0  # shedding until the consumer has taken the marker
            if self._event_bytes + cost > EVENT_BACKLOG:
                if self.sheds_events:  # keep what it holds, drop what follows
                    self._mark_dropped()
                else:
                    self._too_slow()
                return 0
            # Past the connection's bound the unanswered requests holding the most go
            # first, not whichever request's event happens to cross it (a new one holds
            # nothing). One the guest answered is not cancelled: its caller would be told
            # a request failed that ran (events it still holds are charged all the same).
            # A shedding channel lets go of what it holds and keeps only its marker, so it
            # is a candidate until then and each round takes one candidate out.
            while self._conn._event_bytes + cost > CONNECTION_EVENT_BACKLOG:
                pending = (
                    ch
                    for ch in self._conn._channels.values()
                    if (not ch._answered and ch._event_bytes > DROPPED_EVENT_COST) or ch is self
                )
                most = max(pending, key=lambda ch: ch._event_bytes)
                if most._event_bytes == 0:
                    most = self  # the backlog is all answered requests': this one goes
                most._too_slow()
                if most is self:
                    return 0
            self._charge_event(frame)
        # Its JSON is checked by the consumer that takes it (next), once: a bad payload ends
        # the connection then (the guest's fault, not the consumer's).
        self._put(frame)
        return 0

    def sink_events(self, sink: EventSink) -> None:
        """Hand each EVENT's body (and its size on the wire) to `sink` in the reader as it
        arrives, instead of queuing it for `next()`: for a consumer that only gathers them
        (a listing), so no backlog builds behind a consumer slower than the guest, each
        event is decoded once, and the consumer's own bounds hold instead of
        EVENT_BACKLOG. Set before the REQ is sent. An IsorunError `sink` raises cancels
        the request; the consumer's next `next()` raises it."""
        self._event_sink = sink

    def _sink(self, body: dict[str, Any], size: int) -> None:
        assert self._event_sink is not None
        try:
            self._event_sink(body, size)
        except IsorunError as exc:
            self._give_up(exc)

    def _too_slow(self) -> None:
        if self.sheds_events:  # past the connection's bound: let go of what it holds too
            self._shed_events()
            return
        held = self._event_bytes
        self._give_up(
            ConsumerTooSlowError(
                f"channel {self.id}: {held} bytes of events from the guest were not taken in "
                "time; the request was cancelled"
            )
        )

    def _shed_events(self) -> None:
        """Drop the events queued, and those that follow until the consumer takes the one
        DROPPED_EVENT put in their place."""
        kept: deque[_Item] = deque()
        for item in self._inbox:
            if isinstance(item, Frame) and item.kind is Kind.EVENT:
                self._release_event(item)
            else:
                kept.append(item)
        self._inbox = kept
        self._mark_dropped()

    def _mark_dropped(self) -> None:
        """Drop the events that follow until the consumer takes the DROPPED_EVENT queued
        now (charged like any, so the accounting stays exact)."""
        marker = Frame(self.id, Kind.EVENT, DROPPED_EVENT)
        self._charge_event(marker)
        self._dropped_marker = marker
        self._put(marker)

    def _queue_data(self, frame: Frame) -> None:
        for item in reversed(self._inbox):  # the trailing run of data items
            if not isinstance(item, _Data):
                break
            if item.kind is frame.kind:  # the newest of its kind: joined only there
                if len(item.data) + len(frame.payload) <= MAX_JOINED:
                    item.data += frame.payload
                    return
                break
        self._put(_Data(frame.kind, frame.payload))

    def _put(self, item: _Item) -> None:
        self._inbox.append(item)
        self._arrived.set()

    def _grant(self, n: int) -> None:
        self._send_window += n
        if self._send_window > 0:
            self._send_ready.set()
        if self._send_window >= WINDOW:
            self._all_acked.set()

    async def next(self) -> Frame:
        """The next frame from the guest; an EVENT's or RESP's JSON decoded (Frame.json)."""
        loop = asyncio.get_running_loop()
        if self._inbox and (
            self._spent >= DISPATCH_BUDGET or loop.time() - self._ran_since >= DISPATCH_SLICE_S
        ):
            await asyncio.sleep(0)  # a backlog is taken in turns with other sandboxes
            self._ran_since, self._spent = loop.time(), 0
        while not self._inbox:
            self._arrived.clear()
            await self._wait_arrival()
            self._ran_since, self._spent = loop.time(), 0
        item = self._inbox.popleft()
        if isinstance(item, BaseException):
            # A dead connection ends the channel; a local failure (see `fail`) leaves it for
            # the consumer to abandon, which cancels the request in the guest.
            self.closed = self.closed or self._conn.is_closed
            raise item
        if isinstance(item, _Data):
            self._spent += len(item.data) + FRAME_COST
            self._consumed(len(item.data))
            return Frame(self.id, item.kind, bytes(item.data))
        if item.kind is Kind.EVENT:
            self._release_event(item)
        elif item.kind is Kind.RESP:
            self.closed = True
            self._conn._forget(self.id)
        return self._decoded(item)

    def _decoded(self, frame: Frame) -> Frame:
        """`frame` with its JSON decoded (charged to this turn: not FRAME_COST, which the
        reader charged, or a consumer would fall behind a flood of tiny events); a bad payload
        is the guest's fault: the connection's end."""
        self._spent += len(frame.payload) + frames.json_cost(frame.payload) * JSON_VALUE_COST
        try:
            body = frames.decode_json(frame.payload)
        except ProtocolError as exc:
            self._conn._fail(exc)
            self.closed = True
            raise
        return Frame(frame.chan, frame.kind, frame.payload, body)

    async def _wait_arrival(self) -> None:
        idle = self._conn.idle_timeout if self.timed else None
        if idle is None:
            await self._arrived.wait()
            return
        # keepalives move `_heard` without waking us: the wait is re-armed from it
        left = self._heard + idle - asyncio.get_running_loop().time()
        if left <= 0:
            raise GuestError(
                f"the guest sent nothing on this request for {idle:g} s, not even its "
                "keepalive: its agent or kernel is hung (or starved of CPU)",
                "unresponsive",
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await self._arrived.wait()

    def _charge_event(self, frame: Frame) -> None:
        cost = len(frame.payload) + EVENT_OVERHEAD
        self._event_bytes += cost
        self._conn._event_bytes += cost

    def _release_event(self, frame: Frame) -> None:
        cost = len(frame.payload) + EVENT_OVERHEAD
        self._event_bytes -= cost
        self._conn._event_bytes -= cost
        if frame is self._dropped_marker:
            self._dropped_marker = None

    def widen(self, n: int) -> None:
        """Let the guest send `n` bytes more than WINDOW ahead of our credit (after the
        REQ: the guest ignores credit for a channel it does not know), or what is left of
        the connection's `widened_limit`. What it sends is held here until taken, so only
        for a consumer that takes it at once."""
        n = min(n, self._conn.widened_limit - self._conn._widened)
        if n <= 0:
            return
        self._widened += n
        self._conn._widened += n
        self._recv_window += n
        self._conn._send_nowait(frames.encode_credit(self.id, n))

    def _consumed(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= CREDIT_BATCH:
            grant, self._unacked = self._unacked, 0
            self._recv_window += grant
            # Not waiting for the stream to drain: taking data must not hang on a guest
            # that stopped reading. Credits are a few bytes per quarter window taken.
            self._conn._send_nowait(frames.encode_credit(self.id, grant))

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
            self._put(exc)

    def _give_up(self, exc: BaseException) -> None:
        """Cancel the request for its consumer, who learns why at its next `next()`."""
        self.abandon(exc)

    def abandon(self, why: BaseException | None = None) -> None:
        """Give up on the request without waiting: send CANCEL unless the guest answered
        already, and forget the channel (the reader drops what the guest still sends on it).
        Never blocks, so it is safe in cancellation and error paths even when the guest
        stopped reading. A consumer waiting in `next()` meanwhile (another task) gets `why`,
        or ChannelClosedError, instead of waiting for frames that no longer come."""
        if self.closed:
            return
        self.closed = True
        answered = False
        for item in self._inbox:
            if isinstance(item, Frame) and item.kind is Kind.EVENT:
                self._release_event(item)
            answered = answered or (isinstance(item, Frame) and item.kind is Kind.RESP)
        self._inbox.clear()
        self._put(why or ChannelClosedError(f"the host gave up on request {self.id}"))
        self._conn._forget(self.id)
        if not answered:
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
        self._wrapped = False  # channel numbers went round: every one was opened once
        self._event_bytes = 0  # queued events of all channels (Channel._deliver)
        self._widened = 0  # windows widened, of all open channels (Channel.widen)
        self._write_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_error: BaseException | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False  # close() was called: the host ends it
        self.hello: dict[str, Any] = {}
        # how long a request may hear nothing (Channel.next) or a send wait for the guest
        # to read (_send); None until the agent granted keepalives: silence says nothing
        self.idle_timeout: float | None = None
        # each send under way: its timeout and when it began (re-timed by _time_requests)
        self._senders: dict[asyncio.Timeout, float] = {}
        self._keepalive_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None

    # What the connection asks for; a test may set them on the class before connecting.
    keepalive_s = KEEPALIVE_S
    idle_after_s = IDLE_AFTER_S
    write_backlog = WRITE_BACKLOG
    widened_limit = CONNECTION_WIDENED

    @classmethod
    async def open_unix(cls, path: str, timeout: float = 10.0) -> AgentConnection:
        connect = asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        return await cls.open(connect, f"the agent socket {path}", timeout)

    @classmethod
    async def open(
        cls,
        connect: Awaitable[StreamPair],
        what: str,
        timeout: float = 10.0,
        hello_extra: Mapping[str, str] | None = None,
    ) -> AgentConnection:
        """Connect through `connect` (an agent stream of any transport), then say hello
        (with `hello_extra`'s fields: a vsock key); each step within `timeout`. `what`
        names the endpoint in errors."""
        try:
            reader, writer = await asyncio.wait_for(connect, timeout)
        except OSError as exc:
            raise ChannelClosedError(f"cannot connect to {what}: {exc}") from exc
        conn = cls(reader, writer)
        try:
            await conn.handshake(timeout, hello_extra)
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

    async def handshake(
        self, timeout: float, extra: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Say hello and skip whatever an earlier connection left in the stream."""
        nonce = os.urandom(12).hex()
        hello = {**(extra or {}), "op": "hello", "nonce": nonce}
        await self._send(frames.encode_json(frames.HELLO_CHAN, Kind.REQ, hello))
        # a bytearray trimmed in place: a guest trickling garbage costs each read its own
        # bytes, not a copy of the whole window
        buf, pos = bytearray(), 0
        async with asyncio.timeout(timeout):
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise ChannelClosedError("agent stream closed during hello")
                buf += data
                if len(buf) > HELLO_SCAN_LIMIT:
                    dropped = len(buf) - HELLO_SCAN_LIMIT
                    del buf[:dropped]
                    pos = max(0, pos - dropped)
                found, pos = frames.find_hello(buf, nonce, pos)
                if found is not None:
                    break
        self.hello, end = found
        self._reader_task = asyncio.create_task(
            self._read_loop(bytes(buf[end:])), name="agent-reader"
        )
        if self.keepalive_s > 0:
            # In the background: the boot is ready at the hello, not a round trip later.
            self._keepalive_task = asyncio.create_task(
                self._ask_keepalive(), name="agent-keepalive"
            )
        return self.hello

    @property
    def features(self) -> frozenset[str]:
        """What the agent said in its hello it does beyond protocol 1 as first written (an
        agent booted before a feature existed names none: a re-adopted VM runs it)."""
        named = self.hello.get("features")
        if not isinstance(named, list):
            return frozenset()
        return frozenset(f for f in named[:64] if isinstance(f, str) and len(f) <= 64)

    async def _ask_keepalive(self) -> None:
        try:
            every = await self._keepalive_granted()
        except IsorunError:
            # The request failed (the guest flooded its channel, say): a guest must not
            # switch the hang detection off that way, so it is timed as one that sends none.
            every = None
        if self.is_closed:
            return
        if every is not None:
            self._time_requests(max(self.idle_after_s, 3 * every))
            return
        # An agent from before keepalives answers {"ok": false}: it sends none. Its requests
        # are not left untimed (a guest could say so to wait for ever): the host asks instead.
        self._time_requests(self.idle_after_s)
        self._probe_task = asyncio.create_task(self._probe(), name="agent-probe")

    async def _keepalive_granted(self) -> float | None:
        """Ask for keepalives: the interval the agent granted, in seconds (None: none)."""
        with self.open_channel() as ch:
            ch.timed = False  # its own deadline is below; a late answer is still taken
            await self.request(ch, {"op": "keepalive", "interval_ms": int(self.keepalive_s * 1000)})
            try:
                async with asyncio.timeout(self.idle_after_s):
                    frame = await self._answer(ch)
            except TimeoutError:
                # Every agent answers every op, an unknown one too: no answer at all is a
                # guest hung since its hello. Its requests are timed from now on (else they
                # would wait for ever), and a late answer still sets what it grants.
                self._time_requests(self.idle_after_s)
                frame = await self._answer(ch)
            answer = frame.json()
        granted = answer.get("interval_ms")
        if answer.get("ok") is True and type(granted) is int and granted > 0:
            return min(granted, 60_000) / 1000  # the agent may round what we asked
        return None

    async def _probe(self) -> None:
        """For an agent that sends no keepalives: while requests wait, ask `health` every
        third of the idle limit; its answer (any RESP) vouches for every request open when
        it was asked. Unanswered, those fail as unresponsive in their own time."""
        loop = asyncio.get_running_loop()
        while not self.is_closed:
            await asyncio.sleep(self.idle_after_s / PROBES_PER_IDLE)
            waiting = [ch for ch in self._channels.values() if ch.timed]
            if not waiting:
                continue
            asked = loop.time()
            try:
                with self.open_channel() as probe:
                    probe.timed = False  # waits as long as the guest takes: one at a time
                    await self.request(probe, {"op": "health"})
                    await self._answer(probe)
            except IsorunError:
                continue  # its send timed out (the requests time out on their own), or closed
            for ch in waiting:
                ch._heard = max(ch._heard, asked)

    @staticmethod
    async def _answer(ch: Channel) -> Frame:
        while (frame := await ch.next()).kind is not Kind.RESP:
            pass
        return frame

    def _time_requests(self, idle: float | None) -> None:
        self.idle_timeout = idle
        for waiting in self._channels.values():
            waiting._arrived.set()  # a wait begun before re-arms with the new timing
        for limit, began in self._senders.items():  # and so does a send (or its queue)
            limit.reschedule(self._send_deadline(began))

    def _send_deadline(self, began: float) -> float | None:
        return None if self.idle_timeout is None else began + self.idle_timeout

    # --- channel management -------------------------------------------------------

    def open_channel(self) -> Channel:
        self._raise_if_closed()
        chan = self._next_chan
        if chan >= 0xFFFFFFFF:
            self._next_chan, self._wrapped = 1, True
        else:
            self._next_chan += 1
        ch = Channel(self, chan)
        self._channels[chan] = ch
        return ch

    async def request(self, ch: Channel, req: dict[str, Any] | bytes) -> None:
        """Send a REQ: a dict, or the JSON `frames.request_payload` made of one (and so
        checked for size) before the channel was opened."""
        payload = req if isinstance(req, bytes) else frames.request_payload(req)
        await self._send(frames.encode(ch.id, Kind.REQ, payload))
        ch._heard = asyncio.get_running_loop().time()  # time queued to send is not the guest's

    def _forget(self, chan: int) -> None:
        ch = self._channels.pop(chan, None)
        if ch is not None:  # the guest sends it nothing more: its wider window is free again
            self._widened -= ch._widened
            ch._widened = 0

    def _was_opened(self, chan: int) -> bool:
        return self._wrapped or 1 <= chan < self._next_chan

    # --- I/O ------------------------------------------------------------------------

    def _send_nowait(self, data: bytes) -> None:
        """Queue one whole frame on the transport without waiting for it to drain. Frames
        are written whole, so this never interleaves with a sender holding the lock."""
        if not self._closed.is_set() and not self._writer.transport.is_closing():
            self._write(data)

    def _write(self, data: bytes) -> None:
        """Put one whole frame on the transport, failing the connection if the guest lets
        what it has not read pile up past `write_backlog`."""
        self._writer.write(data)
        held = self._writer.transport.get_write_buffer_size()
        if held > self.write_backlog:
            self._fail(
                GuestError(
                    f"the guest stopped reading its agent port: {held} bytes from the host "
                    f"wait unread (at most {self.write_backlog} may), credits for output it "
                    "sent meanwhile included; the connection is closed",
                    "unresponsive",
                )
            )

    async def _send(self, data: bytes) -> None:
        self._raise_if_closed()
        began = asyncio.get_running_loop().time()
        try:
            # Bounded once the agent keeps alive: a hung guest stops reading, and a sender
            # (or one queued behind it) would wait for the stream to drain for ever. A send
            # begun before (right after hello) is bounded from then on, from its start. The
            # frame is whole in the buffer or not there: framing survives the timeout.
            async with asyncio.timeout_at(self._send_deadline(began)) as limit:
                self._senders[limit] = began
                try:
                    async with self._write_lock:
                        self._write(data)
                        self._raise_if_closed()
                        await self._writer.drain()
                except (ConnectionError, OSError) as exc:
                    self._fail(ChannelClosedError(f"agent stream write failed: {exc}"))
                    raise self.closed_error() from exc
                finally:
                    del self._senders[limit]
        except TimeoutError:
            if self._closed.is_set():
                raise self.closed_error() from None
            idle = self.idle_timeout or 0.0
            raise GuestError(
                f"the host could not hand this request's data to the guest within {idle:g} s: "
                "the guest stopped reading (its agent or kernel is hung, or starved of CPU)",
                "unresponsive",
            ) from None

    async def _read_loop(self, leftover: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            data, cost = leftover, 0
            while True:
                now = slice_start = loop.time()
                # at most FEED_FRAMES parsed at a time: the rest of a read waits its turn
                for frame in self._decoder.feed(data):
                    # read() does not suspend while the stream has bytes buffered: without a
                    # pause a guest sending frames as fast as it can (64 KiB of empty ones is
                    # 7,000) would hold the event loop, and every other sandbox of the daemon
                    # with it. Paused by what was handled (every 256 frames, MiB of payload,
                    # or JSON decoded), not per read: that slowed a stdout stream by 20%.
                    cost += self._dispatch(frame, now) + len(frame.payload) + FRAME_COST
                    if cost >= DISPATCH_BUDGET or loop.time() - slice_start >= DISPATCH_SLICE_S:
                        cost = 0
                        await asyncio.sleep(0)
                        now = slice_start = loop.time()
                if self._decoder.more:
                    data = b""
                    continue
                data = await self._reader.read(65536)
                if not data:
                    raise ChannelClosedError("agent stream closed by the guest side")
        except asyncio.CancelledError:
            self._fail(ChannelClosedError("agent connection closed by the host"))
            raise
        except (ProtocolError, ChannelClosedError) as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(ChannelClosedError(f"agent stream failed: {exc}"))
        except Exception as exc:  # a dead reader must not leave every request hanging
            self._fail(ProtocolError(f"agent stream handling failed: {exc!r}"[:500]))

    def _dispatch(self, frame: Frame, now: float) -> int:
        """Route one frame; returns what decoding it cost (Channel._deliver)."""
        ch = self._channels.get(frame.chan)
        if ch is None:
            if self._was_opened(frame.chan):
                return 0  # answered or abandoned: what the guest still sends is dropped
            raise ProtocolError(
                f"guest sent a {frame.kind.name} frame on channel {frame.chan}, "
                "which the host never opened"
            )
        ch._heard = now
        if frame.kind is Kind.CREDIT:
            ch._grant(frame.credit())
        elif frame.kind is not Kind.EVENT or frame.payload != KEEPALIVE_PAYLOAD:
            return ch._deliver(frame)
        return 0

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
            ch._put(exc)
            ch._send_ready.set()
            ch._all_acked.set()
        self._channels.clear()

    @property
    def failed(self) -> bool:
        """Closed by the guest's side (a violation, the stream ending), not by the host."""
        return self._closed.is_set() and not self._closing

    async def close(self) -> None:
        self._closing = True
        # Closed first, waited for after: a close() that is itself cancelled meanwhile (or
        # runs in the cleanup of a cancelled task) still leaves nothing open.
        own = (self._keepalive_task, self._probe_task, self._reader_task)
        tasks = [t for t in own if t is not None]
        for task in tasks:
            task.cancel()
        self._fail(ChannelClosedError("agent connection closed by the host"))
        me = asyncio.current_task()
        cancels_before = me.cancelling() if me is not None else 0
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                # the task's own end, unless close() itself was cancelled since it began
                if me is not None and me.cancelling() > cancels_before:
                    raise
            except Exception:  # its failure was the connection's already
                pass
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
