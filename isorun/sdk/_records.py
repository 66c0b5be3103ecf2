"""What the daemon answers, as the SDK hands it on: results, records of files and
processes, usage, and the decoder of exec/attach NDJSON streams into them."""

from __future__ import annotations

import base64
import codecs
import functools
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NotRequired, Self, TypedDict, cast

from isorun.sdk._answers import is_int, loads, shaped, unexpected
from isorun.sdk._callbacks import call_back
from isorun.sdk.errors import (
    error_for,
    stream_error,
)
from isorun.tail import TailBuffer

OutputCallback = Callable[[str], object]

# What exec and Process.wait keep of each stream by default, the newest bytes (as the agent
# client's CAPTURE_LIMIT): a flood, even one streamed to callbacks, must not fill the
# caller's memory, and the end of an output (the error, the summary) is what is read first.
CAPTURE_LIMIT = 64 << 20


class Usage(TypedDict):
    """What `destroy()` returns: measured on the host, and, from the call that ended the
    sandbox, what the daemon billed for it."""

    cpu_ms: int
    mem_peak_bytes: int
    uptime_ms: int
    billed_seconds: NotRequired[int]
    cost_usd: NotRequired[float]


USAGE_KEYS = ("cpu_ms", "mem_peak_bytes", "uptime_ms")


def usage_of(r: Any, where: str) -> Usage:
    """The three measured figures always (0 if missing or null: a sandbox that ended
    meanwhile may have no bill yet), and every other the daemon gave. `r` None is no usage
    at all; one that is not an object, or a figure that is no count, raises ApiError
    `unexpected_answer` (`where` asked for it)."""
    r = shaped({} if r is None else r, where, "a usage")
    for k in (*USAGE_KEYS, "billed_seconds", "cost_usd"):
        v = r.get(k)
        if v is not None and not (is_int(v) or (k == "cost_usd" and isinstance(v, float))):
            raise unexpected(where, f"a usage whose {k!r} is {v!r:.80}, not a number")
    u = {k: v for k, v in r.items() if k not in USAGE_KEYS}
    u.update({k: r.get(k) or 0 for k in USAGE_KEYS})
    return cast(Usage, u)


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int | None
    duration_ms: int
    signal: int | None = None
    timed_out: bool = False
    proc_id: str = ""
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    # Output bytes the sandbox no longer held when they were asked for: a process's output
    # is kept in a ring (1 MiB by default), so a replay after more than that was written
    # starts where the ring does, and a reader that falls behind skips ahead. 0 for exec.
    output_lost: int = 0
    # Bytes of each stream left out of stdout/stderr, the oldest first, to keep them within
    # `capture_limit` (the callbacks saw them all).
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class _Record:
    """A record the daemon sends: built from the fields this SDK knows, so a newer daemon
    that adds one does not break an older SDK."""

    @classmethod
    def of(cls, record: object, where: str) -> Self:
        """The record from the daemon's `record` (answered to `where`); one that is not an
        object, lacks a field without a default or has one of another type raises ApiError
        `unexpected_answer` naming it."""
        what = f"a {cls.__name__} record"
        if not isinstance(record, dict):
            raise unexpected(where, f"{what} that is {type(record).__name__}, not an object")
        known = _fields_of(cast(type, cls))
        for name, (fits, required) in known.items():
            if name not in record:
                if required:
                    raise unexpected(where, f"{what} without its {name!r}")
            elif not fits(record[name]):
                raise unexpected(where, f"{what} whose {name!r} is {record[name]!r:.80}")
        return cls(**{k: v for k, v in record.items() if k in known})


Check = Callable[[object], bool]


@functools.cache
def _fields_of(cls: type) -> dict[str, tuple[Check, bool]]:
    """A record class's fields: a check of a value's type and whether it must be given,
    built once (a listing builds up to 100,000 records)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (_check_of(hints[f.name]), f.default is MISSING and f.default_factory is MISSING)
        for f in fields(cls)
    }


def _check_of(hint: Any) -> Check:
    """Whether a JSON value fits `hint` (the few types records have: str, int, bool, None,
    list[X] and unions of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if len(args) == 2 and type(None) in args:  # the usual `X | None`, kept quick
            inner = _check_of(next(a for a in args if a is not type(None)))
            return lambda v: v is None or inner(v)
        checks = [_check_of(a) for a in args]
        return lambda v: any(c(v) for c in checks)
    if origin is list:
        item = _check_of(args[0]) if args else (lambda v: True)
        return lambda v: isinstance(v, list) and all(item(x) for x in v)
    if hint is type(None):
        return lambda v: v is None
    if hint in (int, str, bool):
        return lambda v: type(v) is hint  # json gives these exactly; True is no int here
    if isinstance(hint, type):
        return lambda v: isinstance(v, hint)
    return lambda v: True


@dataclass
class FileInfo(_Record):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None


@dataclass
class ProcessInfo(_Record):
    proc_id: str
    pid: int
    argv: list[str]
    tag: str
    pty: bool
    running: bool
    exit_code: int | None
    signal: int | None
    started_unix_ms: int
    output_bytes: int
    argv_truncated: bool = False  # argv is cut to its start (a long script) in a listing


def capture_limit_of(limit: int | None) -> int | None:
    """A `capture_limit` argument checked: bytes kept per stream, 0 none, None all."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(
            f"capture_limit={limit!r}: give the bytes of each stream to keep (0: none, "
            f"None: all; default {CAPTURE_LIMIT})"
        )
    return limit


class Capture(TailBuffer):
    """What exec and Process.wait keep of one stream, given back as text."""

    __slots__ = ()

    def text(self, data: bytes) -> str:
        """`data` (what `kept()` gave) as text: a character the cut split starts it as
        U+FFFD no more, its bytes left out."""
        start = 0
        if self.dropped:
            while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
                start += 1
        return data[start:].decode("utf-8", "replace")


@dataclass
class StreamDecoder:
    """Feeds NDJSON exec/attach lines to callbacks (as text, decoded incrementally so a
    multibyte character split across chunks is not mangled) and builds the result, which
    keeps each stream's newest `capture_limit` bytes (without `capture`: nothing, uncounted,
    for the iterators, which hand every chunk on)."""

    on_stdout: OutputCallback | None = None
    on_stderr: OutputCallback | None = None
    capture: bool = True
    proc_id: str = ""
    pid: int = 0
    offset: int = 0
    capture_limit: int | None = CAPTURE_LIMIT
    exit: dict[str, Any] | None = None
    out: Capture = field(init=False)
    err: Capture = field(init=False)
    # the async face's list of what async callbacks returned, awaited after each feed
    pending: list[Awaitable[object]] | None = None
    _dec_out: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    _dec_err: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def __post_init__(self) -> None:
        keep = capture_limit_of(self.capture_limit)
        self.out, self.err = Capture(keep), Capture(keep)

    def feed(self, line: str | bytes) -> tuple[str, bytes] | None:
        if not line.strip():
            return None
        ev = self._record(line)
        t = ev.get("type")
        if t in ("stdout", "stderr"):
            data = self._data(ev)
            self.offset += len(data)
            if self.capture:
                (self.out if t == "stdout" else self.err).add(data)
            if (self.on_stdout if t == "stdout" else self.on_stderr) is not None:
                # decoded here only for a callback: an iterator decodes what feed returns
                self._call_back(t, self.text(t, data))
            return t, data
        if t == "start":
            proc_id, pid = ev.get("proc_id"), ev.get("pid")
            if not isinstance(proc_id, str) or not is_int(pid):
                raise self._malformed("a start record without its proc_id and pid")
            self.proc_id, self.pid = proc_id, pid
        elif t == "attached":
            at = ev.get("offset", 0)
            if not is_int(at):
                raise self._malformed("an attached record whose offset is no number")
            self.offset = at
        elif t == "gap":
            # a slow reader was skipped ahead: what it missed still moves the position, or a
            # resume from `offset` would replay output already delivered
            at = ev.get("offset")
            lost = ev.get("lost")
            if isinstance(at, int) and not isinstance(at, bool):
                self.offset = at
            elif isinstance(lost, int) and not isinstance(lost, bool) and lost > 0:
                self.offset += lost
        elif t == "exit":
            self.exit = ev
        elif t == "error":
            raise stream_error(ev)
        return None

    def _record(self, line: str | bytes) -> dict[str, Any]:
        try:
            ev = loads(line)
        except ValueError:
            raise self._malformed("a line cut short or not JSON") from None
        if not isinstance(ev, dict):
            raise self._malformed("a record that is not an object")
        return ev

    def _data(self, ev: dict[str, Any]) -> bytes:
        raw = ev.get("data")
        if not isinstance(raw, str):
            raise self._malformed("an output record without its data")
        try:
            return base64.b64decode(raw, validate=True)
        except ValueError:  # binascii.Error: bytes that are no base64 were dropped silently
            raise self._malformed("output that is not base64") from None

    def _malformed(self, what: str) -> Exception:
        """A stream the daemon (or a proxy before it) broke: an API error the caller's
        `except IsorunError` catches, saying how to pick the process up again."""
        again = f"; {self.follow_again()}" if self.proc_id else ""
        message = f"the output stream had {what}{again}"
        return error_for(502, {"error": {"code": "stream_malformed", "message": message}})

    def follow_again(self) -> str:
        """How to follow the process on from the output delivered so far: from offset 0,
        callbacks would get that output twice."""
        return (
            f"follow it again with sandbox.processes.connect({self.proc_id!r})"
            f".wait(offset={self.offset})"
        )

    def text(self, stream: str, data: bytes) -> str:
        """A stream's bytes as text, decoded incrementally: a character split across two
        chunks comes whole with the second."""
        return str((self._dec_out if stream == "stdout" else self._dec_err).decode(data))

    def _call_back(self, stream: str, text: str) -> None:
        """Hand `text` to the stream's callback, if any; nothing for a chunk that held only
        part of a character (it comes whole with the next)."""
        cb = self.on_stdout if stream == "stdout" else self.on_stderr
        if cb is not None and text:
            call_back(f"on_{stream}", cb, text, self.pending)

    def end(self) -> None:
        """The stream ended: an incomplete character the decoders still hold goes to the
        callbacks too (as U+FFFD, as into the result's text)."""
        if self.on_stdout is None and self.on_stderr is None:
            return
        for stream, tail in self.rest():
            self._call_back(stream, tail)

    def rest(self) -> list[tuple[str, str]]:
        """What the streams' decoders still hold at the end (an incomplete character)."""
        tails = {"stdout": self._dec_out, "stderr": self._dec_err}
        return [(s, t) for s, d in tails.items() if (t := d.decode(b"", True))]

    def result(self) -> ExecResult:
        if self.exit is None:
            raise error_for(
                502,
                {
                    "error": {
                        "code": "stream_cut",
                        "message": "the output stream ended before the process did; "
                        + self.follow_again(),
                    }
                },
            )
        code, sig, took = (self.exit.get(k) for k in ("exit_code", "signal", "duration_ms"))
        # what no process ends with (a `sys.exit(256)` in the CLI would report success)
        if not (code is None or (is_int(code) and 0 <= code <= 255)) or not (
            sig is None or (is_int(sig) and 1 <= sig <= 64)
        ):
            raise self._malformed(f"an exit record with exit code {code!r} and signal {sig!r}")
        timed_out = self.exit.get("timed_out") or False
        if not isinstance(timed_out, bool):  # "false" is truthy: not read as True
            raise self._malformed(f"an exit record whose timed_out is {timed_out!r}")
        out, err = self.out.kept(), self.err.kept()
        return ExecResult(
            stdout=self.out.text(out),
            stderr=self.err.text(err),
            exit_code=code,
            duration_ms=took if is_int(took) else 0,
            signal=sig,
            timed_out=timed_out,
            proc_id=str(self.exit.get("proc_id") or self.proc_id),
            stdout_bytes=out,
            stderr_bytes=err,
            output_lost=sum(
                n
                for n in (self.exit.get("lost"), self.exit.get("gap_bytes"))
                if is_int(n) and n > 0
            ),
            stdout_dropped=self.out.dropped,
            stderr_dropped=self.err.dropped,
        )
