"""What the sync and async faces share: HTTP clients, request building, response checks,
streams cut short, uploads in chunks. No I/O style is assumed here (the daemon's
whereabouts: _daemon.py; results and the stream decoder: _records.py)."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import math
import os
import signal
import socket
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import IO, Any, Protocol
from urllib.parse import quote, urlencode

import httpx

from isorun.errors import ConfigError, IsorunError
from isorun.fsnames import surrogate_problem
from isorun.sdk._answers import ID, Kind, loads, shaped
from isorun.sdk._callbacks import raised_by_a_callback
from isorun.sdk._daemon import Settings
from isorun.sdk._records import CAPTURE_LIMIT, OutputCallback, StreamDecoder, Usage
from isorun.sdk.errors import (
    ApiError,
    DaemonUnavailable,
    SandboxClosedError,
    SandboxEndedError,
    error_for,
    stream_error,
)

__all__ = ["error_for"]

DEFAULT_TIMEOUT = 60.0  # a request's, unless it says otherwise
CREATE_TIMEOUT = 1800.0  # a first `Sandbox("python")` may build the image (~100 s)
# The daemon holds a stdin write (or close) at most 60 s for a process that does not read,
# then answers 409 stdin_full/stdin_queued: the SDK waits longer, or it would say the daemon
# is gone (and a caller would resend bytes the 409 says are still to come).
STDIN_TIMEOUT = 90.0
# A kill answers once the process is gone: after `grace` for one that ignores SIGTERM.
KILL_MARGIN_S = 30.0


def kill_timeout(grace: float) -> float:
    return grace + KILL_MARGIN_S


# Raw file transfers: the body may pause as long as the guest takes to write or read.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)
# NDJSON streams (exec output, process streams, watches, pull and create progress) carry a
# keepalive record through every silence of the daemon's `stream_keepalive_s` (its
# /v1/health says how long; daemon/keepalive.py). One that carries nothing for four of
# them, and at least this long, has lost its daemon or network: DaemonUnavailable. At
# least 90 s: past the daemon's own 60 s limit on a silent guest, which it reports as such.
STREAM_IDLE_FLOOR_S = 90.0
# A longer limit is none: a socket takes at most ~1e9 s, and an interval past this from a
# daemon's health (its own longest is 3600 s) is no daemon's.
STREAM_IDLE_MAX_S = 7 * 86400.0
_UNKNOWN = object()


def stream_idle_limit(health: Any) -> float | None:
    """The read timeout for NDJSON streams from a daemon whose /v1/health said `health`:
    None (no limit) for a daemon that sends no keepalives, where silence says nothing.
    ISORUN_STREAM_IDLE_TIMEOUT_S overrides it (0: no limit)."""
    override = os.environ.get("ISORUN_STREAM_IDLE_TIMEOUT_S")
    if override:
        try:
            limit = float(override)
        except ValueError:
            raise ConfigError(
                f"ISORUN_STREAM_IDLE_TIMEOUT_S={override!r} is not a number of seconds "
                "(0 turns the limit off)"
            ) from None
        return limit if 0 < limit <= STREAM_IDLE_MAX_S else None
    every = health.get("stream_keepalive_s") if isinstance(health, dict) else None
    if isinstance(every, int | float) and not isinstance(every, bool) and every > 0:
        limit = max(STREAM_IDLE_FLOOR_S, 4 * every)
        return limit if limit <= STREAM_IDLE_MAX_S else None
    return None


def _health_body(resp: httpx.Response) -> Any:
    try:
        return loads(resp.content) if resp.status_code == 200 else None
    except ValueError:
        return None


def transport_error(exc: httpx.TransportError, where: str) -> DaemonUnavailable:
    """An httpx transport failure as our own error (the SDK raises only IsorunErrors)."""
    what = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        msg = (
            f"no isorun daemon answers at {where} ({what}): start one with `isorund`, or "
            "check ISORUN_API_URL"
        )
    elif isinstance(exc, httpx.TimeoutException):
        msg = f"the isorun daemon at {where} did not answer in time ({type(exc).__name__})"
    else:
        msg = (
            f"the connection to the isorun daemon at {where} was lost ({what}); sandboxes "
            "keep running: retry, or reconnect with Sandbox.connect(sandbox_id)"
        )
    return DaemonUnavailable(msg)


def undecodable(exc: httpx.HTTPError, asked: str) -> ApiError:
    """An answer httpx could not read, the connection fine (a body its Content-Encoding
    does not decode: a proxy's, a broken daemon's)."""
    return ApiError(
        f"the answer to {asked} could not be read ({type(exc).__name__}: {exc}): is api_url "
        "(or ISORUN_API_URL) an isorun daemon, with no proxy before it that changes answers?",
        502,
        "undecodable",
    )


def http_error(exc: httpx.HTTPError, where: str, asked: str) -> IsorunError:
    """Any httpx failure as our own error (the SDK raises only IsorunErrors)."""
    if isinstance(exc, httpx.TransportError):
        return transport_error(exc, where)
    return undecodable(exc, asked)


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, where: str, asked: str) -> None:
        self._inner, self._where, self._asked = inner, where, asked

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except httpx.HTTPError as exc:
            raise http_error(exc, self._where, self._asked) from exc

    def close(self) -> None:
        self._inner.close()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, where: str, asked: str) -> None:
        self._inner, self._where, self._asked = inner, where, asked

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.HTTPError as exc:
            raise http_error(exc, self._where, self._asked) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


def _client_closed() -> IsorunError:
    return SandboxClosedError("this isorun client was closed; make a new one")


class Client(httpx.Client):
    """httpx.Client whose transport failures (also while a body streams) raise
    DaemonUnavailable, so `except IsorunError` catches everything the SDK raises."""

    def __init__(self, where: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._where = where
        self._stream_idle: Any = _UNKNOWN
        # what a request on this client raises once it is closed (set by its Sandbox)
        self.closed_error: Callable[[], IsorunError] = _client_closed

    def ndjson_timeout(self, others: float = 30.0) -> httpx.Timeout:
        """Timeouts for an NDJSON stream: `others` for connect, write and pool; reads are
        limited only where the daemon fills silences with keepalives (asked once per
        client)."""
        if self._stream_idle is _UNKNOWN:
            if os.environ.get("ISORUN_STREAM_IDLE_TIMEOUT_S"):
                self._stream_idle = stream_idle_limit(None)
            else:
                self._stream_idle = stream_idle_limit(_health_body(self.get("/v1/health")))
        return httpx.Timeout(others, read=self._stream_idle)

    def send(self, request: httpx.Request, **kw: Any) -> httpx.Response:
        if self.is_closed:  # httpx would raise a bare RuntimeError
            raise self.closed_error()
        asked = f"{request.method} {request.url}"
        try:
            resp = super().send(request, **kw)
        except httpx.HTTPError as exc:  # also reading the body: a bad gzip one
            raise http_error(exc, self._where, asked) from exc
        assert isinstance(resp.stream, httpx.SyncByteStream)
        resp.stream = _SyncStream(resp.stream, self._where, asked)
        return resp


class AsyncClient(httpx.AsyncClient):
    """The asyncio twin of `Client`."""

    def __init__(self, where: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._where = where
        self._stream_idle: Any = _UNKNOWN
        self.closed_error: Callable[[], IsorunError] = _client_closed

    async def ndjson_timeout(self, others: float = 30.0) -> httpx.Timeout:
        """As Client.ndjson_timeout."""
        if self._stream_idle is _UNKNOWN:
            if os.environ.get("ISORUN_STREAM_IDLE_TIMEOUT_S"):
                self._stream_idle = stream_idle_limit(None)
            else:
                health = _health_body(await self.get("/v1/health"))
                self._stream_idle = stream_idle_limit(health)
        return httpx.Timeout(others, read=self._stream_idle)

    async def send(self, request: httpx.Request, **kw: Any) -> httpx.Response:
        if self.is_closed:
            raise self.closed_error()
        asked = f"{request.method} {request.url}"
        try:
            resp = await super().send(request, **kw)
        except httpx.HTTPError as exc:
            raise http_error(exc, self._where, asked) from exc
        assert isinstance(resp.stream, httpx.AsyncByteStream)
        resp.stream = _AsyncStream(resp.stream, self._where, asked)
        return resp


def sync_client(s: Settings) -> Client:
    transport = httpx.HTTPTransport(uds=s.uds) if s.uds else None
    return Client(
        s.uds or s.base_url,
        base_url=s.base_url,
        transport=transport,
        headers=s.headers(),
        timeout=httpx.Timeout(DEFAULT_TIMEOUT),
    )


def async_client(s: Settings) -> AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=s.uds) if s.uds else None
    return AsyncClient(
        s.uds or s.base_url,
        base_url=s.base_url,
        transport=transport,
        headers=s.headers(),
        timeout=httpx.Timeout(DEFAULT_TIMEOUT),
    )


def stream_cut(exc: DaemonUnavailable, dec: StreamDecoder) -> DaemonUnavailable:
    """`exc` for a process output stream: the process runs on; say how to pick it up from
    the output `dec` delivered (also as the error's `proc_id` and `offset`)."""
    if not dec.proc_id:
        return exc
    return DaemonUnavailable(
        f"{exc}. Process {dec.proc_id} runs on in the sandbox: {dec.follow_again()}",
        proc_id=dec.proc_id,
        offset=dec.offset,
    )


@contextlib.contextmanager
def following(dec: StreamDecoder) -> Iterator[None]:
    """Around a process output stream: a lost daemon says how to follow the process again;
    lost after the exit record, it is no loss (the result is whole), and the block ends."""
    try:
        yield
    except DaemonUnavailable as exc:
        if dec.exit is not None:
            return
        raise stream_cut(exc, dec) from exc


def abandoned(exc: BaseException, dec: StreamDecoder) -> bool:
    """Whether a foreground exec that raised `exc` left its command running with no one to
    reach it: it started, did not exit, and `exc` is no error of the SDK's (those say how to
    follow the process again) but the caller's: ^C, a cancel, a callback that raised (even
    an SDK error: its own request failed)."""
    callers = raised_by_a_callback(exc) or not isinstance(exc, IsorunError)
    return bool(dec.proc_id) and dec.exit is None and callers


# An abandoned foreground command is killed with this grace; the kill may take so long.
ABANDON_GRACE_S = 1.0
ABANDON_KILL_TIMEOUT_S = 10.0


def kill_request(sandbox_id: str, proc_id: str) -> tuple[str, dict[str, Any]]:
    """The path and keyword arguments of the kill of an abandoned foreground command."""
    return proc_path(sandbox_id, proc_id, "kill"), {
        "json": {"grace": ABANDON_GRACE_S},
        "timeout": ABANDON_KILL_TIMEOUT_S,
    }


def note_kill(exc: BaseException, sandbox_id: str, proc_id: str, err: Exception | None) -> None:
    """Say on `exc` what became of the command it abandoned."""
    if err is None:
        exc.add_note(f"isorun: process {proc_id} was killed in sandbox {sandbox_id}")
    else:
        exc.add_note(
            f"isorun: process {proc_id} could not be killed ({err}); it may run on in sandbox "
            f"{sandbox_id}"
        )


# The longest NDJSON line the SDK reads. The daemon's longest records are output records of
# 64 KiB of bytes (~88 KiB as base64); a line with no end in sight is no record of its.
NDJSON_LINE_MAX = 8 << 20


class NdjsonLines:
    """Splits a stream's bytes into NDJSON lines: at newline bytes only (httpx's iter_lines
    also splits at CR, VT, FS, U+0085, U+2028..., which a JSON string may hold raw or a
    broken line may), and at most NDJSON_LINE_MAX bytes held for one line."""

    def __init__(self, asked: str) -> None:
        self._asked = asked
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        if b"\n" not in chunk:
            self._bound(self._buf)
            return []
        *lines, rest = self._buf.split(b"\n")
        for line in lines:
            self._bound(line)
        self._bound(rest)
        self._buf = rest
        return [bytes(line) for line in lines]

    def end(self) -> list[bytes]:
        """The last line, one that had no newline (the decoders say it was cut short)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest else []

    def _bound(self, line: bytes | bytearray) -> None:
        if len(line) > NDJSON_LINE_MAX:
            raise error_for(
                502,
                {
                    "error": {
                        "code": "stream_malformed",
                        "message": f"the NDJSON answer to {self._asked} had a line of over "
                        f"{NDJSON_LINE_MAX >> 20} MiB, longer than any record the daemon sends",
                    }
                },
            )


def body_chunks(resp: httpx.Response) -> Iterator[bytes]:
    """resp.iter_bytes(), a body httpx cannot decode (a bad gzip one) an ApiError too (a
    lost connection is DaemonUnavailable already)."""
    try:
        yield from resp.iter_bytes()
    except httpx.HTTPError as exc:
        raise undecodable(exc, asked(resp)) from exc


async def abody_chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The async twin of body_chunks."""
    try:
        async for chunk in resp.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        raise undecodable(exc, asked(resp)) from exc


def ndjson_lines(resp: httpx.Response) -> Iterator[bytes]:
    """An NDJSON answer's lines (see NdjsonLines)."""
    lines = NdjsonLines(asked(resp))
    for chunk in body_chunks(resp):
        yield from lines.feed(chunk)
    yield from lines.end()


async def andjson_lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The async twin of ndjson_lines."""
    lines = NdjsonLines(asked(resp))
    async for chunk in abody_chunks(resp):
        for line in lines.feed(chunk):
            yield line
    for line in lines.end():
        yield line


def refused(resp: httpx.Response) -> None:
    """For an answer opened as a stream: one that refused (an error, a redirect) raises
    what `check` says of it, its body read first."""
    if resp.status_code >= 300:
        try:
            resp.read()
        except httpx.HTTPError as exc:
            raise undecodable(exc, asked(resp)) from exc
        check(resp)


async def arefused(resp: httpx.Response) -> None:
    """The async twin of refused."""
    if resp.status_code >= 300:
        try:
            await resp.aread()
        except httpx.HTTPError as exc:
            raise undecodable(exc, asked(resp)) from exc
        check(resp)


def untime_body(resp: httpx.Response) -> None:
    """Read the rest of `resp`'s body with no read timeout: a file's bytes may pause as long
    as the guest or the file takes (a FIFO, a slow device), while the answer had the
    client's timeout to start (a daemon that never answers is still noticed). httpcore takes
    a body's read timeout from the request's timeout dict when the body is first read."""
    timeout = resp.request.extensions.get("timeout")
    if isinstance(timeout, dict):
        timeout["read"] = None


def wake_reader(resp: httpx.Response) -> None:
    """Shut down the connection under a streamed answer, so a read blocked on it in another
    thread returns now (closing the socket alone leaves it blocked until the next bytes)."""
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def read_cut(
    exc: DaemonUnavailable, path: str, got: int | None, sandbox: httpx.Response | None
) -> IsorunError:
    """The error for a file read whose bytes stopped short of the end. `sandbox` is the
    daemon's answer, asked right after, to GET /v1/sandboxes/{id} (None if it gave none: then
    the connection really was lost). A daemon that answers broke the body off itself: the
    sandbox ended, or its guest failed to send the rest."""
    if sandbox is None:
        return exc
    so_far = f" after {got} bytes" if got is not None else ""
    if sandbox.status_code >= 400:
        try:
            check(sandbox)
        except ApiError as err:
            return type(err)(f"reading {path} broke off{so_far}: {err}", err.status, err.code)
    try:
        info = loads(sandbox.content)
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    if info.get("state") == "ended":
        return SandboxEndedError(
            f"sandbox {info.get('id')} ended while {path} was being read{so_far} "
            f"({info.get('end_reason') or 'no reason recorded'})",
            410,
            "sandbox_ended",  # as the daemon's 410s
        )
    return ApiError(
        f"reading {path} broke off{so_far}: the guest failed to send the rest (the daemon's "
        "log says why); the sandbox runs on, so the read can be retried",
        502,
        "read_failed",
    )


def watch_change(line: str | bytes) -> tuple[str, str] | None:
    """The (op, path) of a watch stream's line; None for other records (keepalives); an
    error record, or a line that is no record, raises ApiError."""
    if not line.strip():
        return None
    try:
        ev = loads(line)
    except ValueError:
        raise _watch_malformed("a line cut short or not JSON") from None
    if not isinstance(ev, dict):
        raise _watch_malformed("a record that is not an object")
    if ev.get("type") == "fs":
        op, path = ev.get("op"), ev.get("path")
        if not isinstance(op, str) or not isinstance(path, str):
            raise _watch_malformed("a change record without its op and path")
        return op, path
    if ev.get("type") == "error":
        raise stream_error(ev)
    return None


def _watch_malformed(what: str) -> ApiError:
    message = f"the watch stream had {what}; watch again"
    return error_for(502, {"error": {"code": "stream_malformed", "message": message}})


READ_FORMATS = ("text", "bytes", "stream")


def check_read_format(format: str) -> None:
    if format not in READ_FORMATS:
        raise ValueError(f"format={format!r}: use one of {', '.join(READ_FORMATS)}")


def check(resp: httpx.Response, *, want_json: bool = True) -> Any:
    """The body of a daemon's answer (decoded JSON, or bytes with want_json=False); an
    error answer, a redirect or a body that is not what the daemon sends raise ApiError."""
    status = resp.status_code
    if status >= 400:
        try:
            body = loads(resp.content)
        except ValueError:
            body = None
        raise error_for(status, body)
    if status >= 300:
        raise ApiError(
            f"{asked(resp)} was answered {status} {resp.reason_phrase}, a redirect to "
            f"{resp.headers.get('location', '(no location)')!r}: the SDK does not follow "
            "redirects; set api_url (or ISORUN_API_URL) to the daemon's own address",
            status,
            "redirect",
        )
    if not want_json:
        return resp.content
    why = ""
    if resp.headers.get("content-type", "").startswith("application/json"):
        try:
            return loads(resp.content)
        except ValueError as exc:
            why = f" ({exc})"
    raise ApiError(
        f"{asked(resp)} was answered {status} with a body that is not JSON{why} "
        f"({resp.headers.get('content-type') or 'no content-type'}, starting "
        f"{resp.content[:80]!r}): is api_url (or ISORUN_API_URL) an isorun daemon?",
        status,
        "not_json",
    )


def answer(resp: httpx.Response, what: str = "an answer", **shape: Kind) -> dict[str, Any]:
    """`check(resp)` of a route that answers an object: one that is not, or lacks a field of
    `shape` or has it of another kind, raises ApiError `unexpected_answer` naming it."""
    return shaped(check(resp), asked(resp), what, **shape)


def created(info: Any, where: str) -> dict[str, Any]:
    """The sandbox a create answered, with the id every later request needs."""
    return shaped(info, where, "a sandbox", id=ID)


def asked(resp: httpx.Response) -> str:
    try:
        return f"{resp.request.method} {resp.request.url}"
    except RuntimeError:  # a response built without its request
        return "the request"


def url_id(kind: str, value: object) -> str:
    """A sandbox or process id as one URL path segment; one that could not be an id (empty,
    or with a '/', which would address another route) raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{kind} {value!r} is empty: pass the id a sandbox or process was given "
            "(`isorun ls`, Sandbox.list() and sandbox.processes.list() list them)"
        )
    if "/" in value or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} is not an id: ids look like 'sb-0123456789abcdef'")
    return quote(value, safe="")


def handle_repr(kind: str, ident: str, **about: object) -> str:
    """`<Process p3 pid=41 sandbox=sb-...>`: which handle it is, in logs and at the REPL
    (not an object address)."""
    extra = "".join(
        f" {k}" if v is True else f" {k}={v}"
        for k, v in about.items()
        if v not in (None, "", False)
    )
    return f"<{kind} {ident or '(not started)'}{extra}>"


class _SandboxHandle(Protocol):
    id: str
    _info: dict[str, Any]
    _usage: Usage | None


def sandbox_repr(sb: _SandboxHandle) -> str:
    """`<Sandbox sb-... image=python>`, and `destroyed` once it is."""
    return handle_repr(
        type(sb).__name__, sb.id, image=sb._info.get("image"), destroyed=sb._usage is not None
    )


class _ProcessHandle(Protocol):
    id: str
    pid: int


def process_repr(p: _ProcessHandle, sandbox_id: str) -> str:
    """`<Process p3 pid=41 sandbox=sb-...>` (or Pty, AsyncProcess, AsyncPty)."""
    return handle_repr(type(p).__name__, p.id, pid=p.pid, sandbox=sandbox_id)


def sandbox_path(sandbox_id: str, tail: str = "") -> str:
    return f"/v1/sandboxes/{url_id('sandbox id', sandbox_id)}" + (f"/{tail}" if tail else "")


def proc_tail(proc_id: str, tail: str) -> str:
    return f"processes/{url_id('process id', proc_id)}/{tail}"


def check_background(
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    check: bool,
    capture_limit: int | None = CAPTURE_LIMIT,
) -> None:
    """exec(background=True) returns before any output: refuse what it would ignore."""
    given = [n for n, v in (("on_stdout", on_stdout), ("on_stderr", on_stderr)) if v is not None]
    if capture_limit != CAPTURE_LIMIT:
        raise ValueError(
            "capture_limit with background=True: nothing is captured until the process's "
            "wait(), so pass it there"
        )
    if given:
        raise ValueError(
            f"{' and '.join(given)} with background=True would never be called: pass "
            f"{'them' if len(given) > 1 else 'it'} to the process's wait(), or iterate the "
            "process for (stream, text) chunks"
        )
    if check:
        raise ValueError(
            "check=True with background=True: the command has not exited when exec returns; "
            "check the exit_code of the process's wait() instead"
        )


def create_body(
    image: str,
    vcpus: int | None,
    memory_mib: int | None,
    disk_mib: int | None,
    env: dict[str, str] | None,
    metadata: dict[str, str] | None,
    sandbox_timeout: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"image": image}
    for k, v in (
        ("vcpus", vcpus),
        ("memory_mib", memory_mib),
        ("disk_mib", disk_mib),
        ("env", env),
        ("metadata", metadata),
        ("sandbox_timeout", sandbox_timeout),
    ):
        if v is not None:
            body[k] = v
    return body


def exec_body(
    cmd: str | list[str],
    env: dict[str, str] | None,
    cwd: SandboxPath | None,
    user: str | None,
    timeout: float | None,
    stdin: str | bytes | bool | None,
    background: bool,
) -> dict[str, Any]:
    """Foreground: `stdin` bytes are fed, then EOF. Background: `stdin=True` (or bytes, sent
    right after the start by the caller) keeps stdin open for `send_stdin`/`close_stdin`."""
    body: dict[str, Any] = {"argv": list(cmd)} if isinstance(cmd, list | tuple) else {"cmd": cmd}
    if env:
        body["env"] = env
    if cwd:
        body["cwd"] = file_path(cwd)
    if user:
        body["user"] = user
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
    ):
        # json.dumps would say "Out of range float values are not JSON compliant"
        raise ValueError(
            f"timeout={timeout!r}: give the seconds as a finite number (None or 0: no limit)"
        )
    if timeout:
        body["timeout"] = timeout
    if background:
        body["background"] = True
        if stdin is not None and stdin is not False:
            body["open_stdin"] = True
    elif stdin is True or stdin is False:
        raise ValueError("stdin=True is for background=True; pass str or bytes to feed a command")
    elif stdin is not None:
        raw = to_bytes(stdin, "stdin")
        if len(raw) > EXEC_STDIN_MAX:
            raise ValueError(
                f"stdin of {len(raw)} bytes is over the {EXEC_STDIN_MAX >> 20} MiB a command "
                "takes with it: write it to a file (files.write) and redirect it (cmd < file)"
            )
        body["stdin"] = base64.b64encode(raw).decode()
    return body


# The daemon takes at most this many stdin bytes per request; larger sends are split.
STDIN_CHUNK = 1 << 20


def stdin_chunks(data: str | bytes) -> list[bytes]:
    raw = to_bytes(data, "stdin")
    return [raw[i : i + STDIN_CHUNK] for i in range(0, len(raw), STDIN_CHUNK)] or [b""]


def pty_body(
    rows: int,
    cols: int,
    cmd: str | list[str] | None,
    env: dict[str, str] | None,
    cwd: SandboxPath | None,
    user: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"rows": rows, "cols": cols}
    if isinstance(cmd, list | tuple):
        body["argv"] = list(cmd)
    elif cmd is not None:
        body["cmd"] = cmd
    for k, v in (("env", env), ("cwd", file_path(cwd) if cwd else None), ("user", user)):
        if v:
            body[k] = v
    return body


def signal_number(sig: int | str) -> int:
    """A signal's number from a number, a `signal.Signals` or a name ("TERM", "SIGTERM")."""
    if isinstance(sig, str):
        name = sig.upper()
        try:
            return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"no signal is named {sig!r} (e.g. 'TERM', 'SIGUSR1', 9)") from None
    if isinstance(sig, int) and not isinstance(sig, bool):
        return int(sig)
    raise TypeError(f"a signal is an int or a name, not {type(sig).__name__}")


def proc_path(sandbox_id: str, proc_id: str, tail: str) -> str:
    return sandbox_path(sandbox_id, proc_tail(proc_id, tail))


Whole = str | bytes | bytearray | memoryview


def to_bytes(data: Whole, what: str = "data") -> bytes:
    """str (UTF-8) or a bytes-like object as bytes; anything else is a TypeError naming
    `what` (bytes(123) would be 123 zero bytes)."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be str or bytes, not {type(data).__name__}")


# A path in a sandbox as the SDK takes it: bytes for a name that is not UTF-8.
SandboxPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def file_path(path: object) -> str:
    """A sandbox path as the API takes it: str, or bytes for a name that is not UTF-8
    (each byte that is not UTF-8 then held as a lone surrogate, as os.fsdecode and the
    API's listings hold it). A path that is not text is a TypeError (an int was read as a
    name relative to the home directory)."""
    if isinstance(path, str | bytes | os.PathLike):
        got = os.fspath(path)
        if isinstance(got, bytes):
            got = got.decode("utf-8", "surrogateescape")
        if isinstance(got, str):
            if problem := surrogate_problem(got):
                raise ValueError(f"sandbox path {got!r} {problem}")
            return got
    raise TypeError(
        f"a sandbox path must be str or bytes (or os.PathLike of either), not {type(path).__name__}"
    )


def with_query(url: str, params: Mapping[str, str | int]) -> str:
    """`url` with `params` as its query, a path's surrogates sent as the bytes they stand
    for (%E9): httpx's own params refuse to encode a surrogate."""
    return (
        url
        + "?"
        + urlencode(
            {
                k: v.encode("utf-8", "surrogateescape") if isinstance(v, str) else str(v)
                for k, v in params.items()
            }
        )
    )


def json_body(obj: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that send `obj` as a JSON body (as httpx's json= does), a
    surrogate of a path as its "\\udcXX" escape: httpx's own json= writes UTF-8, which
    refuses a surrogate."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def whole_chunks(raw: bytes) -> bytes | Iterator[bytes]:
    """A whole body to send: in WRITE_CHUNK pieces past one. httpcore's sync write of one
    big body re-copies what is left after every partial send of the socket: 200 MiB took
    50 s, against 7 s in pieces."""
    if len(raw) <= WRITE_CHUNK:
        return raw
    view = memoryview(raw)
    return (bytes(view[i : i + WRITE_CHUNK]) for i in range(0, len(raw), WRITE_CHUNK))


# A command's whole stdin goes in its request as base64, which the daemon takes up to 64 MiB
# of (models.ExecRequest): 48 MiB of bytes.
EXEC_STDIN_MAX = 48 << 20


# File modes an int written in decimal by mistake gives (mode=644 is 0o1204: sticky, and
# --w----r--). Each of them, read as octal, is a mode no one means; refused like the API's
# bare "644".
_DECIMAL_MODE_TYPOS = frozenset((600, 640, 644, 660, 664, 666, 700, 750, 755, 770, 775, 777, 1777))


def mode_param(mode: int) -> str:
    """A file mode as the API reads it (octal), refusing one that is a decimal typo."""
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise ValueError(f"mode={mode!r} must be an int from 0 to 0o7777 (e.g. 0o644)")
    if mode in _DECIMAL_MODE_TYPOS:
        raise ValueError(
            f"mode={mode} is the decimal number {mode} ({oct(mode)}); write mode=0o{mode} "
            f"for rw bits {mode}, or mode={oct(mode)} if that is what you mean"
        )
    return oct(mode)


WRITE_CHUNK = 1 << 20
BytesSource = IO[bytes] | Iterable[bytes]


def _chunk_of(chunk: object, source: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise _not_bytes(source, chunk)


def _not_bytes(source: object, chunk: object = "") -> TypeError:
    if isinstance(source, io.TextIOBase) or isinstance(chunk, str):
        return TypeError(
            f"files.write needs bytes, but {type(source).__name__} gives text (str): open "
            "the file in binary mode ('rb'), give bytes chunks, or pass the text as one str"
        )
    return TypeError(
        f"files.write needs bytes chunks, but {type(source).__name__} gave {type(chunk).__name__}"
    )


def _not_writable(source: object) -> TypeError:
    return TypeError(
        "files.write takes str, bytes, a binary file object or an iterable of bytes chunks, "
        f"not {type(source).__name__}"
    )


def _read_chunks(source: BytesSource) -> Iterator[bytes]:
    if hasattr(source, "read"):
        while chunk := _chunk_of(source.read(WRITE_CHUNK), source):  # "" raises, not loops
            yield chunk
    else:
        for chunk in source:
            if got := _chunk_of(chunk, source):
                yield got


def write_chunks(source: BytesSource) -> Iterator[bytes]:
    """A file object's or an iterable's chunks as bytes; text (a file opened in text mode, or
    str chunks) raises TypeError, the first chunk at once, before anything is sent."""
    if isinstance(source, io.TextIOBase):
        raise _not_bytes(source)
    if not hasattr(source, "read") and not isinstance(source, Iterable):
        raise _not_writable(source)
    it = _read_chunks(source)
    first = next(it, None)
    return iter(()) if first is None else itertools.chain([first], it)


async def awrite_chunks(
    source: BytesSource | AsyncIterable[bytes],
    run_sync: Callable[[Callable[[], bytes | None]], Awaitable[bytes | None]],
) -> AsyncIterator[bytes]:
    """`write_chunks` for the async face: a sync source is read by `run_sync` (in a worker
    thread, off the event loop)."""
    if isinstance(source, io.TextIOBase):
        raise _not_bytes(source)
    if not (hasattr(source, "read") or isinstance(source, Iterable | AsyncIterable)):
        raise _not_writable(source)
    if isinstance(source, AsyncIterable):
        ait = _achecked(source)
    else:
        it = _read_chunks(source)
        ait = _athreaded(it, run_sync)
    first = await anext(ait, None)
    return _aprepend(first, ait)


async def _achecked(source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in source:
        if got := _chunk_of(chunk, source):
            yield got


async def _athreaded(
    it: Iterator[bytes],
    run_sync: Callable[[Callable[[], bytes | None]], Awaitable[bytes | None]],
) -> AsyncIterator[bytes]:
    while (chunk := await run_sync(lambda: next(it, None))) is not None:
        yield chunk


async def _aprepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk
