"""Typed operations of the guest agent (docs/protocol.md) over an AgentConnection.

Every answer from the guest is checked field by field before use: the guest is hostile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import sys
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isorun.agent.frames import Frame, Kind, request_payload
from isorun.agent.mux import IO_CHUNK, WINDOW, AgentConnection, Channel, EventSink
from isorun.agent.validate import (
    FileEntry,
    ProcInfo,
    as_bool,
    as_count,
    as_float,
    as_int,
    as_name,
    as_opt_int,
    as_str,
    parse_entry,
    parse_proc,
)
from isorun.errors import ChannelClosedError, FileNotFoundInGuest, GuestError, ProtocolError
from isorun.fsnames import holds_surrogate
from isorun.tail import TailBuffer

# A file read's credit window: under TCG a credit's round trip is long enough that 256 KiB
# in flight bounded downloads (bench/bench_agent.py, same run: 83 MiB/s, 131 with 2 MiB).
# What the daemon holds of a download whose HTTP client stalls is at most this; all of a
# sandbox's together, at most mux.CONNECTION_WIDENED more than WINDOW each.
READ_WINDOW = 2 << 20
# Request fields that are file names (isorun/fsnames.py: how one that is not UTF-8 is held).
_NAME_FIELDS = ("path", "src", "dst", "cwd")
# A callback may return an awaitable: it is awaited before more output is read, so a slow
# consumer holds back the guest through the channel's credits instead of buffering.
OutputCallback = Callable[[bytes], object]
# What one listing (files or processes) may take from the guest: each entry may be up to a
# frame (a 64 KiB name), so a count alone would let a guest fill the host's memory; 64 MiB
# is 670 bytes for each of the most entries, and what a hostile guest can make one call hold.
MAX_LISTING_BYTES = 64 << 20
# and at most this many entries: each costs the daemon's event loop to turn into JSON
MAX_LISTING_ENTRIES = 100_000
# What an entry costs in host memory besides its strings (the Python objects), counted
# against MAX_LISTING_BYTES with them (_entry_cost, _proc_cost): a guest's many tiny strings
# cost ~10x what they weigh.
ENTRY_OVERHEAD = 256
MAX_COUNT = (1 << 63) - 1
# The error codes of the protocol (docs/protocol.md); any other a guest sends is "internal"
GUEST_CODES = frozenset(
    {
        "invalid",
        "not_found",
        "exists",
        "permission",
        "not_dir",
        "is_dir",
        "not_empty",
        "no_space",
        "cross_device",
        "io",
        "unsupported",
        "busy",
        "internal",
    }
)
# How long past an exec's own timeout the host waits for the guest's answer: the guest's
# TERM-then-KILL grace and the drain of the output, slow under emulation.
EXEC_DEADLINE_GRACE_S = 30.0
# What exec/attach keep of each stream by default when capturing (the newest bytes)
CAPTURE_LIMIT = 64 << 20
StdinSource = bytes | AsyncIterable[bytes]


@dataclass(slots=True)
class ExecResult:
    proc_id: str
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_ms: int
    run_us: int
    stdout: bytes = b""
    stderr: bytes = b""
    # bytes of each stream left out of `stdout`/`stderr`, the oldest first, to keep the
    # capture within its limit (the callbacks saw them all)
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(slots=True)
class Attachment:
    """Where a replay started, how many bytes the ring had already dropped, and how many it
    dropped while the reader fell behind during the follow (a sum: the guest says how often)."""

    offset: int
    lost: int = 0
    gap_bytes: int = 0
    # called once the guest said where the replay starts (before any output it has)
    on_attached: Callable[[], object] | None = None


def _capture_limit(capture: bool, limit: int) -> int:
    """What a process's collection keeps of each stream (0: nothing)."""
    if not capture:
        return 0
    if limit <= 0:
        raise ValueError(f"capture_limit must be a positive number of bytes, not {limit}")
    return limit


def _raise_for(resp: dict[str, Any]) -> dict[str, Any]:
    ok = resp.get("ok")
    if ok is True:
        return resp
    if ok is not False:
        raise ProtocolError(f"guest answer has no boolean 'ok': {str(resp)[:200]}")
    code = as_str(resp, "code", default="internal")
    if code not in GUEST_CODES:
        # the guest's code picks the API's status: "unresponsive" (504) is the host's to say
        code = "internal"
    message = as_str(resp, "error", default="guest agent error")[:4096]
    if code == "not_found":
        raise FileNotFoundInGuest(message, code)
    raise GuestError(message, code)


# How long open_watch waits for the guest to say its watch is set up (a recursive watch of
# a big tree walks it first: seconds under TCG).
WATCH_READY_S = 30.0
# Changes kept from before the guest said "watching" (the real agent sends at most one
# overflow then); past it a single overflow stands for the rest: a guest cannot make the
# host hold what the channel's own bound would have refused.
WATCH_EARLY_MAX = 64


class Watch:
    """A watch in the guest: iterate (op, path) changes until it ends (its path went away)
    or `close()`."""

    def __init__(self, ch: Channel, path: str) -> None:
        self._ch, self._path = ch, path
        self._early: list[tuple[str, str]] = []  # changes that came before "watching"
        self._ended = False
        self._fell_behind = False  # events were dropped (perhaps "watching" among them)

    async def _next_change(self, until_ready: bool) -> tuple[str, str] | None:
        """The next change; None at the end (or, with until_ready, once the guest watches)."""
        while not self._ended:
            try:
                frame = await self._ch.next()
            except ChannelClosedError:
                if self._ended:  # closed by close() (another task) while waiting here
                    return None
                raise
            if frame.kind is Kind.RESP:
                self._ended = True
                self._ch.abandon()
                _raise_for(frame.json())
                return None
            if frame.kind is not Kind.EVENT:
                raise ProtocolError(f"guest sent {frame.kind.name} to a watch")
            ev = frame.json()
            if ev.get("event") == "fs":
                return as_str(ev, "op"), as_name(ev, "path")
            if ev.get("event") == "dropped":  # we fell behind: changes were left out
                self._fell_behind = True
                return "overflow", self._path
            if until_ready and ev.get("event") == "watching":
                return None
        return None

    async def ready(self) -> None:
        while (change := await self._next_change(until_ready=True)) is not None:
            if len(self._early) < WATCH_EARLY_MAX:
                self._early.append(change)
            else:
                self._early[-1] = ("overflow", self._path)
            if self._fell_behind:  # "watching" may be among what was dropped: not waited for
                return

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> tuple[str, str]:
        if self._early:
            return self._early.pop(0)
        change = await self._next_change(until_ready=False)
        if change is None:
            raise StopAsyncIteration
        return change

    def close(self) -> None:
        """Stop watching (the guest is told to)."""
        self._ended = True
        self._ch.abandon()


class AgentClient:
    """Asyncio client of one guest agent."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn

    # --- plumbing -------------------------------------------------------------------

    async def _open(
        self,
        req: dict[str, Any],
        sheds_events: bool = False,
        event_sink: EventSink | None = None,
    ) -> Channel:
        self._check_names(req)
        payload = request_payload(req)  # too big: refused before a channel exists
        ch = self.conn.open_channel()
        ch.sheds_events = sheds_events
        if event_sink is not None:  # before the REQ: its first event may follow at once
            ch.sink_events(event_sink)
        try:
            await self.conn.request(ch, payload)
        except BaseException:
            # Timed out or cancelled while the REQ waited for the stream: it may be whole in
            # the buffer and reach the guest later, so cancel it there too (a CANCEL for a
            # channel the guest never saw is ignored).
            ch.abandon()
            raise
        return ch

    def _check_names(self, req: dict[str, Any]) -> None:
        """A name that is not UTF-8 (held as surrogates) goes only to an agent that turns
        its escapes back into the bytes (`fs_names`): an older one would make them U+FFFD,
        and write, rename or run in a file of another name."""
        if "fs_names" in self.conn.features:
            return
        for field in _NAME_FIELDS:
            v = req.get(field)
            if isinstance(v, str) and holds_surrogate(v):
                raise GuestError(
                    f"{field} {v!r} is not UTF-8, and this sandbox's guest agent predates "
                    "such names (it would name another file): use a command in the sandbox, "
                    "or a sandbox started since",
                    "unsupported",
                )

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A request whose whole answer is one RESP."""
        ch = await self._open({"op": op, **fields})
        with ch:
            while True:
                frame = await ch.next()
                if frame.kind is Kind.RESP:
                    return _raise_for(frame.json())
                if frame.kind is not Kind.EVENT:
                    raise ProtocolError(f"guest sent {frame.kind.name} to a '{op}' request")

    # --- processes ------------------------------------------------------------------

    async def exec(
        self,
        cmd: str | None = None,
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: StdinSource | None = None,
        pty: tuple[int, int] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_start: Callable[[str, int], object] | None = None,
        capture: bool = True,
        capture_limit: int = CAPTURE_LIMIT,
        tag: str | None = None,
    ) -> ExecResult:
        """Run a command to completion, streaming its output as it is written. With
        `capture` the result holds each stream's last `capture_limit` bytes."""
        keep = _capture_limit(capture, capture_limit)
        req = _exec_request(cmd, argv, env, cwd, user, timeout, pty, tag)
        req["stdin"] = stdin is not None
        ch = await self._open(req)
        # The guest enforces `timeout`; the host waits a grace more for its frames (not for
        # its own callbacks), then gives up on a guest that does not (a wedged or hostile
        # one would otherwise hold the call for good).
        deadline = None
        if timeout:
            deadline = asyncio.get_running_loop().time() + timeout + EXEC_DEADLINE_GRACE_S
        with ch:
            feeder = _start_feeder(ch, stdin) if stdin is not None else None
            try:
                return await _collect_process(
                    ch,
                    on_stdout,
                    on_stderr,
                    on_start,
                    keep,
                    None,
                    deadline,
                )
            except _GuestLate:
                raise GuestError(
                    f"the guest did not end the command within its {timeout:g} s timeout "
                    f"(waited {EXEC_DEADLINE_GRACE_S:g} s more); the request was cancelled",
                    "unresponsive",
                ) from None
            finally:
                if feeder is not None:
                    feeder.cancel()

    async def spawn(
        self,
        cmd: str | None = None,
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        pty: tuple[int, int] | None = None,
        tag: str | None = None,
        ring_bytes: int | None = None,
        open_stdin: bool = False,
    ) -> tuple[str, int]:
        """Start a background process; returns (proc_id, pid). With `open_stdin` its stdin
        is a pipe that `attach(..., stdin=...)` feeds later; otherwise /dev/null."""
        req = _exec_request(cmd, argv, env, cwd, user, timeout, pty, tag)
        req["background"] = True
        req["stdin"] = open_stdin
        if ring_bytes is not None:
            req["ring_bytes"] = ring_bytes
        resp = await self._call_req(req)
        return as_str(resp, "proc_id"), as_int(resp, "pid")

    async def _call_req(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.pop("op")
        return await self.call(op, **req)

    async def attach(
        self,
        proc_id: str,
        *,
        offset: int = 0,
        output: bool = True,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        capture: bool = True,
        capture_limit: int = CAPTURE_LIMIT,
        attachment: Attachment | None = None,
        stdin: StdinSource | None = None,
    ) -> ExecResult:
        """Replay a process's buffered output from `offset`, follow it live, wait for exit.
        With `stdin`, its bytes go to the process's stdin (then EOF, as for exec)."""
        keep = _capture_limit(capture, capture_limit)
        req = {"op": "attach", "proc_id": proc_id, "offset": offset, "output": output}
        if stdin is not None:
            req["stdin"] = True
        ch = await self._open(req)
        with ch:
            feeder = _start_feeder(ch, stdin) if stdin is not None else None
            try:
                return await _collect_process(
                    ch,
                    on_stdout,
                    on_stderr,
                    None,
                    keep,
                    attachment,
                )
            finally:
                if feeder is not None:
                    feeder.cancel()

    async def list_procs(self) -> list[ProcInfo]:
        # Long lists come as EVENT {"procs": [...]} batches before the RESP's own batch,
        # gathered as they arrive (Channel.sink_events).
        found: list[ProcInfo] = []
        received = 0

        def take(body: dict[str, Any], _size: int) -> None:
            nonlocal received
            procs = body.get("procs", [])
            if not isinstance(procs, list) or len(found) + len(procs) > 8192:
                raise ProtocolError("list_procs answer is not a list of at most 8192 processes")
            parsed = [parse_proc(p) for p in procs]
            received += sum(map(_proc_cost, parsed))
            if received > MAX_LISTING_BYTES:
                raise ProtocolError(f"list_procs answer exceeds {MAX_LISTING_BYTES >> 20} MiB")
            found.extend(parsed)

        ch = await self._open({"op": "list_procs"}, event_sink=take)
        with ch:
            frame = await ch.next()
            if frame.kind is not Kind.RESP:
                raise ProtocolError(f"guest sent {frame.kind.name} to list_procs")
            body = frame.json()
            _raise_for(body)
            take(body, len(frame.payload))
            return found

    async def signal(self, proc_id: str, signal: int) -> None:
        await self.call("signal", proc_id=proc_id, signal=signal)

    async def kill(self, proc_id: str, grace: float = 2.0) -> tuple[int | None, int | None]:
        resp = await self.call("kill", proc_id=proc_id, grace_ms=int(grace * 1000))
        return as_opt_int(resp, "exit_code"), as_opt_int(resp, "signal")

    async def resize(self, proc_id: str, rows: int, cols: int) -> None:
        await self.call("resize", proc_id=proc_id, rows=rows, cols=cols)

    async def close_stdin(self, proc_id: str) -> None:
        await self.call("close_stdin", proc_id=proc_id)

    async def set_defaults(
        self,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> None:
        fields: dict[str, Any] = {}
        if env is not None:
            fields["env"] = dict(env)
        if cwd:
            fields["cwd"] = cwd
        if user:
            fields["user"] = user
        await self.call("set_defaults", **fields)

    # --- files ----------------------------------------------------------------------

    async def read_file(
        self, path: str, offset: int = 0, length: int = -1
    ) -> AsyncGenerator[bytes, None]:
        """Stream a file's bytes out of the guest."""
        # aclosing: a reader that stops early closes the channel now, not when collected
        async with contextlib.aclosing(self._read_frames(path, offset, length)) as frames:
            async for frame in frames:
                if frame.kind is Kind.OUT:
                    yield frame.payload

    async def file_size(self, path: str) -> int:
        """The size of the file a read of `path` opens (links followed), by the guest's
        fstat: 0 for a device and most pseudo-files, whatever they hold. The same errors
        as read_file, and none of its bytes sent."""
        size = 0
        async with contextlib.aclosing(self._read_frames(path, 0, 0)) as frames:
            async for frame in frames:
                if frame.kind is Kind.EVENT and (ev := frame.json()).get("event") == "file":
                    size = as_count(ev, "size")
        return size

    async def _read_frames(
        self, path: str, offset: int, length: int
    ) -> AsyncGenerator[Frame, None]:
        """A read_file's OUT and EVENT frames, until its answer (raised if an error)."""
        ch = await self._open({"op": "read_file", "path": path, "offset": offset, "length": length})
        ch.widen(READ_WINDOW - WINDOW)
        with ch:
            while True:
                frame = await ch.next()
                if frame.kind is Kind.RESP:
                    _raise_for(frame.json())
                    return
                if frame.kind not in (Kind.OUT, Kind.EVENT):
                    raise ProtocolError(f"guest sent {frame.kind.name} while reading a file")
                yield frame

    async def read_bytes(self, path: str, limit: int = 1 << 30) -> bytes:
        parts: list[bytes] = []
        total = 0
        async for chunk in self.read_file(path):
            total += len(chunk)
            if total > limit:
                raise GuestError(f"{path} is larger than the {limit}-byte read limit", "invalid")
            parts.append(chunk)
        return b"".join(parts)

    async def write_file(
        self,
        path: str,
        data: StdinSource,
        *,
        mode: int | None = None,
        append: bool = False,
        user: str | None = None,
    ) -> int:
        """Stream bytes into a guest file (a regular one atomically replaced unless
        appending). Without `mode` an existing file keeps its mode, a new one gets 0644.
        A new file, and the directories made for it, are `user`'s (default: the sandbox's
        user, set_defaults'); a replaced file keeps its owner."""
        req: dict[str, Any] = {"op": "write_file", "path": path, "append": append, "mkdirs": True}
        if mode is not None:
            req["mode"] = mode
        if user is not None:
            req["user"] = user
        ch = await self._open(req)
        # Feed and read at once: the guest may answer before it took every byte (a path it
        # cannot create, a full disk), and then grants no more credit for the rest.
        with ch:
            feeder = _start_feeder(ch, data)
            try:
                while True:
                    frame = await ch.next()
                    if frame.kind is Kind.RESP:
                        return as_count(_raise_for(frame.json()), "bytes")
                    if frame.kind is not Kind.EVENT:
                        raise ProtocolError(f"guest sent {frame.kind.name} while writing a file")
            finally:
                feeder.cancel()

    async def list(self, path: str, depth: int = 1) -> list[FileEntry]:
        entries: list[FileEntry] = []
        received = 0

        def take(body: dict[str, Any], _size: int) -> None:
            # gathered as the guest sends them (Channel.sink_events): a listing's own bounds
            # hold, not the backlog a slower consumer would let build
            nonlocal received
            batch = body.get("entries")
            if not isinstance(batch, list):
                raise ProtocolError("list event without an 'entries' list")
            for raw in batch:
                entry = parse_entry(raw)
                entries.append(entry)
                # bounded by what the entries hold, not by entries alone: one may be 20 KiB
                # of path
                received += _entry_cost(entry)
            if len(entries) > MAX_LISTING_ENTRIES or received > MAX_LISTING_BYTES:
                raise GuestError(
                    f"{path} lists more than {MAX_LISTING_ENTRIES:,} entries or "
                    f"{MAX_LISTING_BYTES >> 20} MiB of them: list a narrower path or depth",
                    "invalid",
                )

        ch = await self._open({"op": "list", "path": path, "depth": depth}, event_sink=take)
        with ch:
            frame = await ch.next()
            if frame.kind is not Kind.RESP:
                raise ProtocolError(f"guest sent {frame.kind.name} to a list request")
            _raise_for(frame.json())
            # The guest sends a directory's entries in its order, not reading it whole:
            # sorted here, each directory's name then what is under it. ("/" as NUL, which
            # no name holds, sorts as comparing the components would, without a list of
            # them per entry: 600 slashes each in 98,000 entries took 3.8 s of the event
            # loop to sort, this 0.3; each key a copy of its path, counted in _entry_cost)
            entries.sort(key=lambda e: e.path.replace("/", "\x00"))
            return entries

    async def stat(self, path: str) -> FileEntry:
        resp = await self.call("stat", path=path)
        return parse_entry(resp.get("entry"))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundInGuest:
            return False
        except GuestError as exc:
            if exc.code == "not_dir":  # a path under a file: nothing there either
                return False
            raise
        return True

    async def mkdir(
        self, path: str, parents: bool = True, mode: int = 0o755, user: str | None = None
    ) -> None:
        """mkdir (-p by default): the directories made are `user`'s (default: the
        sandbox's user); with parents, those above get 0755 and the last one `mode`."""
        fields: dict[str, Any] = {"path": path, "parents": parents, "mode": mode}
        if user is not None:
            fields["user"] = user
        await self.call("mkdir", **fields)

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self.call("remove", path=path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self.call("rename", src=src, dst=dst)

    async def watch(
        self, path: str, recursive: bool = False
    ) -> AsyncGenerator[tuple[str, str], None]:
        """Yield (op, path) for changes under `path` until the iterator is closed."""
        w = await self.open_watch(path, recursive)
        try:
            async for change in w:
                yield change
        finally:
            w.close()

    async def open_watch(self, path: str, recursive: bool = False) -> Watch:
        """Start watching `path` and return once the guest watches it (an agent with
        `watch_ready`): a change made after this returns is reported. A bad path raises
        here. See docs/protocol.md for the ops."""
        # A burst of changes while the caller is busy (an `npm install`) is reported as an
        # overflow, as inotify does, rather than ending the watch.
        ch = await self._open(
            {"op": "watch", "path": path, "recursive": recursive}, sheds_events=True
        )
        w = Watch(ch, path)
        if "watch_ready" in self.conn.features:
            try:
                await asyncio.wait_for(w.ready(), WATCH_READY_S)
            except TimeoutError:
                pass  # a walk of a vast tree, or a guest that never says: go on watching
            except BaseException:
                w.close()
                raise
        return w

    # --- system ---------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.call("health")

    async def metrics(self) -> dict[str, float]:
        resp = await self.call("metrics")
        keys = (
            "mem_total_bytes",
            "mem_available_bytes",
            "load1",
            "load5",
            "load15",
            "procs_running",
            "uptime_s",
        )
        return {k: as_float(resp, k) for k in keys}

    async def set_clock(self, unix_ns: int) -> None:
        await self.call("set_clock", unix_ns=unix_ns)

    async def reseed(self, entropy: bytes) -> None:
        await self.call("reseed", entropy_b64=base64.b64encode(entropy).decode())

    async def setup_root(self, root: str, scratch: str = "") -> None:
        """Mount the root filesystem (image `root` read-only, `scratch` writable, overlaid)
        and switch to it: for a guest restored from a template that booted without one."""
        await self.call("setup_root", root=root, scratch=scratch)

    async def shutdown(self, mode: str = "poweroff") -> None:
        await self.call("shutdown", mode=mode)


def _entry_cost(entry: FileEntry) -> int:
    """What a listed entry holds of the host's memory, and the sort key made of its path
    (as big). Counted by its strings' size, not their bytes on the wire: CPython keeps every
    character of a string that holds one outside the BMP in 4 bytes."""
    link = sys.getsizeof(entry.link) if entry.link is not None else 0
    return ENTRY_OVERHEAD + sys.getsizeof(entry.name) + 2 * sys.getsizeof(entry.path) + link


def _proc_cost(proc: ProcInfo) -> int:
    """What a listed process holds of the host's memory (as _entry_cost)."""
    strings = sys.getsizeof(proc.proc_id) + sys.getsizeof(proc.tag) + sys.getsizeof(proc.argv)
    return ENTRY_OVERHEAD + strings + sum(map(sys.getsizeof, proc.argv))


def _exec_request(
    cmd: str | None,
    argv: Sequence[str] | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    pty: tuple[int, int] | None,
    tag: str | None,
) -> dict[str, Any]:
    if (cmd is None) == (argv is None):
        raise ValueError("pass exactly one of cmd (a shell string) or argv (a list)")
    req: dict[str, Any] = {"op": "exec"}
    if cmd is not None:
        req["cmd"] = cmd
    else:
        req["argv"] = list(argv or [])
        if not req["argv"]:
            raise ValueError("argv must name a program")
    if env:
        req["env"] = dict(env)
    if cwd:
        req["cwd"] = cwd
    if user:
        req["user"] = user
    if timeout:
        req["timeout_ms"] = max(1, int(timeout * 1000))
    if pty is not None:
        req["pty"] = {"rows": pty[0], "cols": pty[1]}
    if tag:
        req["tag"] = tag
    return req


def _start_feeder(ch: Channel, source: StdinSource) -> asyncio.Task[None]:
    """Feed `source` into the channel beside its reader. If feeding fails (the source
    raised, say), the reader gets that error instead of waiting for an answer that needs
    an EOF which will never come."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            ch.fail(exc)

    feeder = asyncio.create_task(_feed_stdin(ch, source), name=f"agent-stdin:{ch.id}")
    feeder.add_done_callback(done)
    return feeder


async def _feed_stdin(ch: Channel, source: StdinSource) -> None:
    if isinstance(source, bytes | bytearray | memoryview):
        await ch.send_data(bytes(source))
    else:
        async for chunk in source:
            for i in range(0, len(chunk), IO_CHUNK * 8):
                await ch.send_data(bytes(chunk[i : i + IO_CHUNK * 8]))
            # Before asking the source for more: the guest has taken this chunk. A caller
            # that reports a chunk as delivered once the next is requested can trust that.
            await ch.wait_acked()
    await ch.send_eof()


async def _maybe_await(result: object) -> None:
    if inspect.isawaitable(result):
        await result


class _GuestLate(Exception):
    """The guest sent nothing more by the deadline."""


async def _next_by(ch: Channel, deadline: float | None) -> Frame:
    if deadline is None:
        return await ch.next()
    try:
        async with asyncio.timeout_at(deadline) as window:
            return await ch.next()
    except TimeoutError:
        if window.expired():
            raise _GuestLate from None
        raise


async def _collect_process(
    ch: Channel,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    on_start: Callable[[str, int], object] | None,
    capture_limit: int,
    attachment: Attachment | None,
    deadline: float | None = None,
) -> ExecResult:
    """A process's frames to its end; each stream's last `capture_limit` bytes kept."""
    out, err = TailBuffer(capture_limit), TailBuffer(capture_limit)
    started = False
    loop = asyncio.get_running_loop()

    async def call_back(fn: OutputCallback, data: bytes) -> None:
        nonlocal deadline
        began = loop.time()
        await _maybe_await(fn(data))
        if deadline is not None:  # the deadline times the guest, not the caller
            deadline += loop.time() - began

    while True:
        frame = await _next_by(ch, deadline)
        if frame.kind is Kind.OUT:
            if capture_limit:
                out.add(frame.payload)
            if on_stdout is not None:
                await call_back(on_stdout, frame.payload)
        elif frame.kind is Kind.ERR:
            if capture_limit:
                err.add(frame.payload)
            if on_stderr is not None:
                await call_back(on_stderr, frame.payload)
        elif frame.kind is Kind.EVENT:
            ev = frame.json()
            kind = ev.get("event")
            if kind == "started" and on_start is not None and not started:
                started = True  # once: more are the guest's, and each would cost the caller
                on_start(as_str(ev, "proc_id"), as_int(ev, "pid"))
            elif kind == "attached" and attachment is not None:
                attachment.offset = as_count(ev, "offset")
                attachment.lost = as_count(ev, "lost", default=0)
                if attachment.on_attached is not None:
                    attachment.on_attached()
            elif kind == "gap" and attachment is not None:
                gap = as_count(ev, "lost")
                attachment.gap_bytes = min(attachment.gap_bytes + gap, MAX_COUNT)
        elif frame.kind is Kind.RESP:
            resp = _raise_for(frame.json())
            return ExecResult(
                proc_id=as_str(resp, "proc_id", default=""),
                exit_code=as_opt_int(resp, "exit_code"),
                signal=as_opt_int(resp, "signal"),
                timed_out=as_bool(resp, "timed_out", default=False),
                duration_ms=as_int(resp, "duration_ms", default=0),
                run_us=as_int(resp, "run_us", default=0),
                stdout=out.kept(),
                stderr=err.kept(),
                stdout_dropped=out.dropped,
                stderr_dropped=err.dropped,
            )
        else:
            raise ProtocolError(f"guest sent {frame.kind.name} to a process stream")
