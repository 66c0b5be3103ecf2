"""What the sync and async faces share: configuration, the daemon auto-start, request
building, response and NDJSON stream decoding. No I/O style is assumed here."""

from __future__ import annotations

import base64
import codecs
import contextlib
import functools
import io
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, NotRequired, Protocol, Self, TypedDict, cast
from urllib.parse import quote, urlsplit

import httpx

from isorun.errors import ConfigError, IsorunError
from isorun.sdk._callbacks import call_back
from isorun.sdk.errors import (
    ApiError,
    DaemonUnavailable,
    SandboxClosedError,
    SandboxEndedError,
    error_for,
    stream_error,
)
from isorun.tail import TailBuffer

__all__ = ["error_for"]

DEFAULT_SOCKET = "/run/isorun/isorund.sock"
CREATE_TIMEOUT = 1800.0  # a first `Sandbox("python")` may build the image (~100 s)
# Raw file transfers: the body may pause as long as the guest takes to write or read.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)
# NDJSON streams (exec output, process streams, watches, pull and create progress) carry a
# keepalive record through every silence of the daemon's `stream_keepalive_s` (its
# /v1/health says how long; daemon/keepalive.py). One that carries nothing for four of
# them, and at least this long, has lost its daemon or network: DaemonUnavailable. At
# least 90 s: past the daemon's own 60 s limit on a silent guest, which it reports as such.
STREAM_IDLE_FLOOR_S = 90.0
# What exec and Process.wait keep of each stream by default, the newest bytes (as the agent
# client's CAPTURE_LIMIT): a flood, even one streamed to callbacks, must not fill the
# caller's memory, and the end of an output (the error, the summary) is what is read first.
CAPTURE_LIMIT = 64 << 20
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
        return limit if 0 < limit < math.inf else None
    every = health.get("stream_keepalive_s") if isinstance(health, dict) else None
    if isinstance(every, int | float) and not isinstance(every, bool) and 0 < every < math.inf:
        return max(STREAM_IDLE_FLOOR_S, 4 * every)
    return None


def _health_body(resp: httpx.Response) -> Any:
    try:
        return resp.json() if resp.status_code == 200 else None
    except ValueError:
        return None


OutputCallback = Callable[[str], object]


@dataclass
class Settings:
    base_url: str
    uds: str | None
    api_key: str | None
    autostart: bool

    def headers(self) -> dict[str, str]:
        h = {"user-agent": "isorun-python/0.1"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h


def resolve(api_url: str | None, api_key: str | None, autostart: bool | None) -> Settings:
    """Arguments, then ISORUN_API_URL / ISORUN_API_KEY, then the local unix-socket daemon."""
    url = api_url or os.environ.get("ISORUN_API_URL")
    key = api_key or os.environ.get("ISORUN_API_KEY") or None
    if autostart is None:
        autostart = os.environ.get("ISORUN_AUTOSTART", "1") not in ("0", "false", "no")
    if url is None or url.startswith("unix:"):
        sock = (
            url[len("unix:") :].lstrip() if url else os.environ.get("ISORUN_SOCKET", DEFAULT_SOCKET)
        )
        if sock.startswith("//"):
            sock = sock[2:]
        # Only the embedded default is started automatically, never a remote daemon.
        return Settings("http://isorund", sock, key, autostart)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # else httpx's "unsupported protocol" came back as a lost connection to the daemon
        raise ConfigError(
            f"API URL {url!r} (api_url, --api-url or ISORUN_API_URL) is not an isorun API "
            "address: give http://HOST:PORT, https://HOST, or unix:/path/to/isorund.sock"
        )
    return Settings(url.rstrip("/"), None, key, False)


# What a user who may not use the local socket can do instead.
_NOT_ROOT_WAYS = (
    "run this as root, or use a daemon that also serves TCP (root starts it with "
    "`isorund --tcp 127.0.0.1:8181` or ISORUN_TCP, and makes you a key with `isorun keys "
    "create`): set ISORUN_API_URL=http://127.0.0.1:8181 and ISORUN_API_KEY=isr_... (or pass "
    "api_url= and api_key=)"
)


def ensure_daemon(s: Settings, timeout: float = 30.0) -> None:
    """Start `isorund` on the unix socket when nothing answers there (set
    ISORUN_AUTOSTART=0 or pass autostart=False to switch this off)."""
    if s.uds is None or _answers(s.uds):
        return
    if (denied := _denied(s.uds)) is not None:
        # A daemon serves there, but its socket (0600) is root's: starting another would
        # only fail, and on a file this user may not write.
        raise DaemonUnavailable(
            f"you may not connect to the isorun daemon's socket {s.uds} ({denied.strerror}; "
            f"uid {os.geteuid()}): the local daemon runs as root and its socket is root's "
            f"alone. To use it, {_NOT_ROOT_WAYS}"
        )
    if not s.autostart:
        raise DaemonUnavailable(
            f"no isorun daemon answers on {s.uds}: start one with `isorund` (or `isorun "
            "daemon`), or enable auto-start (ISORUN_AUTOSTART=1)"
        )
    state = Path(os.environ.get("ISORUN_STATE_DIR", "/var/lib/isorun"))
    env = dict(os.environ, ISORUN_SOCKET=s.uds)
    log_path = state / "isorund.log"
    try:
        state.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log_start = log.tell()  # what this daemon writes comes after
            proc = subprocess.Popen(
                [sys.executable, "-m", "isorun.daemon"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        raise _cannot_start(s.uds, exc) from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(s.uds):
            return
        if proc.poll() is not None:
            if _answers(s.uds):  # it lost a start-up race to another daemon, which serves
                return
            raise DaemonUnavailable(
                f"started isorund but it exited (status {proc.returncode}) before it answered "
                f"on {s.uds}; the end of {log_path}:\n{_log_tail(log_path, log_start)}"
            )
        time.sleep(0.05)
    raise DaemonUnavailable(
        f"started isorund but it did not answer on {s.uds} within {timeout:.0f}s; see {log_path}"
    )


def _denied(uds: str) -> PermissionError | None:
    """The PermissionError connecting to `uds` raises: a socket (or a directory on its
    path) that belongs to another user, root's daemon's for a non-root caller."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(uds)
        except PermissionError as exc:
            return exc
        except OSError:
            return None
    return None


def _cannot_start(uds: str, exc: OSError) -> DaemonUnavailable:
    """Auto-start could not make the state dir, open the log or run the daemon."""
    head = f"no isorun daemon answers on {uds}, and auto-start could not start one: {exc}"
    if os.geteuid() != 0:
        # the usual case: a user who is not root, with root's default paths
        return DaemonUnavailable(
            f"{head} (uid {os.geteuid()}). The isorun daemon runs as root, with a socket "
            f"and state that are root's: {_NOT_ROOT_WAYS}"
        )
    return DaemonUnavailable(
        f"{head}: set ISORUN_STATE_DIR to a directory it can write, or start `isorund` "
        "yourself (ISORUN_AUTOSTART=0 switches auto-start off)"
    )


def _log_tail(path: Path, start: int, lines: int = 10) -> str:
    """The last `lines` lines `path` got from offset `start` on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"  (cannot read it: {exc})"
    got = text.strip().splitlines()[-lines:]
    return "\n".join("  " + line for line in got) if got else "  (it wrote nothing)"


def _answers(uds: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=uds), timeout=2.0) as c:
            return c.get("http://isorund/v1/health").status_code == 200
    except httpx.HTTPError:
        return False


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


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, where: str) -> None:
        self._inner, self._where = inner, where

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except httpx.TransportError as exc:
            raise transport_error(exc, self._where) from exc

    def close(self) -> None:
        self._inner.close()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, where: str) -> None:
        self._inner, self._where = inner, where

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError as exc:
            raise transport_error(exc, self._where) from exc

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
        try:
            resp = super().send(request, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, self._where) from exc
        assert isinstance(resp.stream, httpx.SyncByteStream)
        resp.stream = _SyncStream(resp.stream, self._where)
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
        try:
            resp = await super().send(request, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, self._where) from exc
        assert isinstance(resp.stream, httpx.AsyncByteStream)
        resp.stream = _AsyncStream(resp.stream, self._where)
        return resp


def sync_client(s: Settings) -> Client:
    transport = httpx.HTTPTransport(uds=s.uds) if s.uds else None
    return Client(
        s.uds or s.base_url,
        base_url=s.base_url,
        transport=transport,
        headers=s.headers(),
        timeout=httpx.Timeout(60.0),
    )


def async_client(s: Settings) -> AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=s.uds) if s.uds else None
    return AsyncClient(
        s.uds or s.base_url,
        base_url=s.base_url,
        transport=transport,
        headers=s.headers(),
        timeout=httpx.Timeout(60.0),
    )


def stream_cut(exc: DaemonUnavailable, proc_id: str) -> DaemonUnavailable:
    """`exc` for a process output stream: the process runs on; say how to pick it up."""
    if not proc_id:
        return exc
    return DaemonUnavailable(
        f"{exc}. Process {proc_id} runs on in the sandbox: follow it again with "
        f"sandbox.processes.connect({proc_id!r}).wait()"
    )


@contextlib.contextmanager
def following(dec: StreamDecoder) -> Iterator[None]:
    """Around a process output stream: a lost daemon says how to follow the process again."""
    try:
        yield
    except DaemonUnavailable as exc:
        raise stream_cut(exc, dec.proc_id) from exc


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
        info = sandbox.json()
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


def watch_change(line: str) -> tuple[str, str] | None:
    """The (op, path) of a watch stream's line; None for other records (keepalives); an
    error record raises."""
    if not line.strip():
        return None
    ev = json.loads(line)
    if ev.get("type") == "fs":
        return str(ev["op"]), str(ev["path"])
    if ev.get("type") == "error":
        raise stream_error(ev)
    return None


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
            body = resp.json()
        except ValueError:
            body = None
        raise error_for(status, body)
    if status >= 300:
        raise ApiError(
            f"{_asked(resp)} was answered {status} {resp.reason_phrase}, a redirect to "
            f"{resp.headers.get('location', '(no location)')!r}: the SDK does not follow "
            "redirects; set api_url (or ISORUN_API_URL) to the daemon's own address",
            status,
            "redirect",
        )
    if not want_json:
        return resp.content
    if resp.headers.get("content-type", "").startswith("application/json"):
        try:
            return resp.json()
        except ValueError:
            pass
    raise ApiError(
        f"{_asked(resp)} was answered {status} with a body that is not JSON "
        f"({resp.headers.get('content-type') or 'no content-type'}, starting "
        f"{resp.content[:80]!r}): is api_url (or ISORUN_API_URL) an isorun daemon?",
        status,
        "not_json",
    )


def _asked(resp: httpx.Response) -> str:
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
    cwd: str | os.PathLike[str] | None,
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
        body["cwd"] = os.fspath(cwd)
    if user:
        body["user"] = user
    if timeout:
        body["timeout"] = timeout
    if background:
        body["background"] = True
        if stdin is not None and stdin is not False:
            body["open_stdin"] = True
    elif stdin is True or stdin is False:
        raise ValueError("stdin=True is for background=True; pass str or bytes to feed a command")
    elif stdin is not None:
        raw = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        body["stdin"] = base64.b64encode(raw).decode()
    return body


# The daemon takes at most this many stdin bytes per request; larger sends are split.
STDIN_CHUNK = 1 << 20


def stdin_chunks(data: str | bytes) -> list[bytes]:
    raw = to_bytes(data)
    return [raw[i : i + STDIN_CHUNK] for i in range(0, len(raw), STDIN_CHUNK)] or [b""]


def pty_body(
    rows: int,
    cols: int,
    cmd: str | list[str] | None,
    env: dict[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    user: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"rows": rows, "cols": cols}
    if isinstance(cmd, list | tuple):
        body["argv"] = list(cmd)
    elif cmd is not None:
        body["cmd"] = cmd
    for k, v in (("env", env), ("cwd", os.fspath(cwd) if cwd else None), ("user", user)):
        if v:
            body[k] = v
    return body


def proc_path(sandbox_id: str, proc_id: str, tail: str) -> str:
    return sandbox_path(sandbox_id, proc_tail(proc_id, tail))


class Usage(TypedDict):
    """What `destroy()` returns: measured on the host, and, from the call that ended the
    sandbox, what the daemon billed for it."""

    cpu_ms: int
    mem_peak_bytes: int
    uptime_ms: int
    billed_seconds: NotRequired[int]
    cost_usd: NotRequired[float]


USAGE_KEYS = ("cpu_ms", "mem_peak_bytes", "uptime_ms")


def usage_of(r: Any) -> Usage:
    """The three measured figures always (0 if missing), and every other the daemon gave."""
    r = r if isinstance(r, dict) else {}
    u = {k: v for k, v in r.items() if k not in USAGE_KEYS}
    u.update({k: int(r.get(k) or 0) for k in USAGE_KEYS})
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
    def of(cls, record: dict[str, Any]) -> Self:
        known = _field_names(cast(type, cls))
        return cls(**{k: v for k, v in record.items() if k in known})


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    """A record class's fields, looked up once (a listing builds up to 100,000 records)."""
    return frozenset(f.name for f in fields(cls))


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
        ev = json.loads(line)
        t = ev.get("type")
        if t in ("stdout", "stderr"):
            data = base64.b64decode(ev["data"])
            self.offset += len(data)
            if t == "stdout":
                if self.capture:
                    self.out.add(data)
                if self.on_stdout is not None:
                    call_back("on_stdout", self.on_stdout, self.text(t, data), self.pending)
            else:
                if self.capture:
                    self.err.add(data)
                if self.on_stderr is not None:
                    call_back("on_stderr", self.on_stderr, self.text(t, data), self.pending)
            return t, data
        if t == "start":
            self.proc_id, self.pid = ev["proc_id"], ev["pid"]
        elif t == "attached":
            self.offset = int(ev.get("offset", 0))
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

    def text(self, stream: str, data: bytes) -> str:
        """A stream's bytes as text, decoded incrementally: a character split across two
        chunks comes whole with the second."""
        return str((self._dec_out if stream == "stdout" else self._dec_err).decode(data))

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
                        "message": "the output stream ended before the process did; reconnect with "
                        f"sandbox.processes.connect({self.proc_id!r})",
                    }
                },
            )
        out, err = self.out.kept(), self.err.kept()
        return ExecResult(
            stdout=self.out.text(out),
            stderr=self.err.text(err),
            exit_code=self.exit.get("exit_code"),
            duration_ms=int(self.exit.get("duration_ms", 0)),
            signal=self.exit.get("signal"),
            timed_out=bool(self.exit.get("timed_out")),
            proc_id=str(self.exit.get("proc_id") or self.proc_id),
            stdout_bytes=out,
            stderr_bytes=err,
            output_lost=sum(
                n
                for n in (self.exit.get("lost"), self.exit.get("gap_bytes"))
                if isinstance(n, int) and not isinstance(n, bool) and n > 0
            ),
            stdout_dropped=self.out.dropped,
            stderr_dropped=self.err.dropped,
        )


# What a file write or stdin takes whole (text as UTF-8).
Whole = str | bytes | bytearray | memoryview


def to_bytes(data: Whole) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


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
