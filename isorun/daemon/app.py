"""HTTP routes (Starlette). JSON in and out; exec and process output stream as NDJSON.

Auth: callers on the unix socket (restricted to root by its file mode) are the local
tenant unless they present a key; TCP callers must present `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from isorun import __version__
from isorun.agent import Attachment, ExecResult, FileEntry, ProcInfo
from isorun.daemon import auth
from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import ApiError, Conflict, Forbidden, NotFound, Unauthorized
from isorun.daemon.imageerrors import (
    image_api_error,
    names_for,
    pull_policy_for,
    refuse_host_path_image,
)
from isorun.daemon.keepalive import with_keepalives
from isorun.daemon.models import (
    CreateKey,
    CreateSandbox,
    ExecRequest,
    KillProcess,
    MkdirOp,
    PtyRequest,
    PullImage,
    RemoveOp,
    RenameOp,
    Resize,
    SetTimeout,
    SignalProcess,
)
from isorun.daemon.progress import ProgressFeed, progress_record
from isorun.daemon.rawstream import BrokenOff, RawStream
from isorun.daemon.sandboxes import CONSOLE_KEPT, Live, SandboxManager
from isorun.daemon.stdin import MAX_CHUNK, StdinPipes
from isorun.daemon.store import LOCAL_TENANT, StateError, StateFullError, Store
from isorun.errors import (
    ChannelClosedError,
    ConfigError,
    ConsumerTooSlowError,
    FileNotFoundInGuest,
    GuestError,
    IsorunError,
    RequestTooLargeError,
)
from isorun.images import Image, ImageError, ImageInUseError, ProgressEvent, admits

log = logging.getLogger("isorund.api")
M = TypeVar("M", bound=BaseModel)
# A JSON body is at most 1 MiB, but exec's: its `stdin` (base64, up to 64 MiB) may make it
# large. Beyond 1 MiB a body may hold only a few JSON items: parsing is synchronous on the
# event loop, and 90 MiB of tiny items took ~9 s of it and 1.1 GiB (a long string: ~0.1 s).
JSON_BODY_LIMIT = 1 << 20
EXEC_BODY_LIMIT = 96 << 20
LARGE_BODY_MAX_ITEMS = 1 << 16
_BODY_LIMITS: dict[type[BaseModel], int] = {ExecRequest: EXEC_BODY_LIMIT}
NDJSON = "application/x-ndjson"

_GUEST_STATUS = {
    "not_found": 404,
    "invalid": 400,
    "exists": 409,
    "permission": 403,
    "not_dir": 400,
    "is_dir": 400,
    "not_empty": 409,
    "busy": 409,
    "no_space": 507,  # the sandbox's disk (or a tmpfs in it) is full, or a quota reached
    "cross_device": 409,  # a rename across filesystems in the guest
    "unsupported": 400,
    "unresponsive": 504,  # the guest went silent, or overran an exec timeout (agent/)
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def map_error(exc: BaseException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, str(exc))
    if isinstance(exc, FileNotFoundInGuest):
        return error_response(404, "not_found", str(exc))
    if isinstance(exc, GuestError):
        return error_response(_GUEST_STATUS.get(exc.code, 500), f"guest_{exc.code}", str(exc))
    if isinstance(exc, StateFullError):
        return error_response(507, "state_disk_full", str(exc))
    if isinstance(exc, StateError):
        return error_response(500, "state_error", str(exc))
    if isinstance(exc, ConsumerTooSlowError):
        return error_response(409, "consumer_too_slow", str(exc))
    if isinstance(exc, ChannelClosedError):
        return error_response(410, "sandbox_ended", f"the sandbox VM went away: {exc}")
    if isinstance(exc, ConfigError):
        return error_response(400, "invalid", str(exc))
    if isinstance(exc, RequestTooLargeError):
        return error_response(413, "too_large", str(exc))
    if isinstance(exc, IsorunError):
        return error_response(500, "internal", str(exc))
    if isinstance(exc, ClientDisconnect):
        # an upload whose client went away: what it wrote was abandoned (write_file keeps
        # the old file); nobody reads this answer
        log.info("client disconnected in the middle of its request body")
        return error_response(400, "client_disconnected", "the client went away mid-request")
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal", f"internal error: {type(exc).__name__}: {exc}")


async def parse(request: Request, model: type[M]) -> M:
    # Read with the limit applied as bytes arrive: a huge body is refused without first
    # being held whole in daemon memory.
    raw = await _raw_body(
        request, _BODY_LIMITS.get(model, JSON_BODY_LIMIT), f"a {model.__name__} JSON body"
    )
    if len(raw) > JSON_BODY_LIMIT and (items := _json_items(raw)) > LARGE_BODY_MAX_ITEMS:
        raise ApiError(
            f"request body is {len(raw)} bytes with about {items} JSON items; past "
            f"{JSON_BODY_LIMIT} bytes only a long `stdin` may make a body large (at most "
            f"{LARGE_BODY_MAX_ITEMS} items): send big input as a file or to an open stdin",
            status=413,
            code="too_large",
        )
    if not raw.strip():
        raw = b"{}"
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(
            "request body is not valid JSON: it nests too deeply", code="malformed_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", code="malformed_json") from exc
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", code="invalid")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = []
        for e in exc.errors()[:10]:
            loc = ".".join(str(x) for x in e["loc"]) or "body"
            parts.append(f"{loc}: {e['msg']}")
        raise ApiError("invalid request: " + "; ".join(parts), status=422, code="invalid") from exc


def _json_items(raw: bytes) -> int:
    """An upper bound of the items of a JSON text, counted in C at memory speed: every
    value but the first follows a `,` or `:` or opens with `[`/`{` (base64 has none)."""
    return sum(raw.count(c) for c in (b",", b":", b"[", b"{"))


def _query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(
            f"query parameter {name}={raw!r} is not an integer", code="invalid"
        ) from None
    if not lo <= v <= hi:
        raise ApiError(f"query parameter {name}={v} must be between {lo} and {hi}", code="invalid")
    return v


def _query_mode(request: Request) -> int:
    """?mode=: octal, written as octal: 0o644 or 0644 (as chmod reads it). A bare number is
    refused, not guessed: read as decimal, a curl user's 644 was 0o1204, and read as octal,
    a client's decimal 420 would be 0o420; both are valid modes, so either guess is silent."""
    raw = request.query_params.get("mode", "")
    if raw and set(raw) <= set("01234567") and not raw.startswith("0"):
        raise ApiError(
            f"query parameter mode={raw!r} is ambiguous: write it in octal with a leading 0 or"
            f" 0o (mode=0{raw} or mode=0o{raw} if you meant chmod's {raw})",
            code="invalid",
        )
    digits = raw[2:] if raw[:2].lower() == "0o" else raw
    if not digits or not digits.isascii() or not set(digits) <= set("01234567"):
        raise ApiError(
            f"query parameter mode={raw!r} is not a mode: give it in octal as 0o644 or 0644",
            code="invalid",
        )
    v = int(digits, 8)
    if v > 0o7777:
        raise ApiError(f"query parameter mode={raw!r} must be within 0..0o7777", code="invalid")
    return v


def _query_flag(request: Request, name: str) -> bool:
    """?name=1|true|0|false (any case: Python's requests sends True as "True"). Anything
    else is refused: `append=yes` read as false silently replaced a file."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw.lower() in ("1", "true"):
        return True
    if raw.lower() in ("0", "false"):
        return False
    raise ApiError(f"query parameter {name}={raw!r} must be 1, true, 0 or false", code="invalid")


def _query_path(request: Request, *others: str) -> str:
    """?path= of a files route, which takes no query parameter but `path` and `others`: a
    misspelt one (`apend=1`) would otherwise be ignored."""
    for k in request.query_params:
        if k != "path" and k not in others:
            takes = ", ".join(("path", *others))
            raise ApiError(
                f"unknown query parameter {k!r}; this route takes {takes}", code="invalid"
            )
    p = request.query_params.get("path")
    if not p or "\x00" in p or len(p) > 4096:
        raise ApiError(
            "query parameter 'path' is required: a path in the sandbox (absolute, or relative"
            " to its working directory), at most 4096 bytes, without NUL",
            code="invalid",
        )
    return p


Handler = Callable[[Request], Awaitable[Response]]
Emit = Callable[[str, bytes], Awaitable[None]]
# Output records a stream may hold for a slow HTTP reader; past that the exec waits, which
# stops returning credit to the guest, which blocks the guest process: memory stays bounded.
STREAM_BACKLOG = 64
Push = Callable[[dict[str, Any]], None]


# The shell of `POST .../pty` without a command: bash when the image has it, else sh.
DEFAULT_SHELL = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"


def error_record(exc: BaseException) -> dict[str, Any]:
    resp = map_error(exc)
    body = json.loads(bytes(resp.body))
    return stream_error_record(resp.status_code, body["error"]["code"], body["error"]["message"])


def _record(entry: FileEntry | ProcInfo) -> dict[str, Any]:
    """A flat record of the guest's as a dict. dataclasses.asdict deep-copies (~8 us an
    entry: a 100,000-entry listing held the event loop for a second)."""
    return {name: getattr(entry, name) for name in entry.__slots__}


def stream_error_record(status: int, code: str, message: str) -> dict[str, Any]:
    """An error inside an NDJSON stream (whose HTTP status was sent as 200 long before):
    the status it would have had as a plain response travels in the record."""
    return {"type": "error", "status": status, "code": code, "message": message}


def image_json(i: Image) -> dict[str, Any]:
    return {
        "digest": i.digest,
        "names": list(i.names),
        "size_bytes": i.size_bytes,
        "disk_bytes": i.disk_bytes,
        "source": i.source,
        "created": i.created,
    }


def create_app(cfg: DaemonConfig, store: Store, manager: SandboxManager) -> Starlette:
    pipes = StdinPipes(store)
    # Pulls and streamed creates run on when their client goes away; stopped with the daemon.
    background: set[asyncio.Task[Any]] = set()

    def _ndjson(lines: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(with_keepalives(lines, cfg.stream_keepalive_s), media_type=NDJSON)

    def _progress_stream(
        work: Callable[[ProgressFeed], Awaitable[dict[str, Any]]],
    ) -> StreamingResponse:
        """Run `work` as a daemon task; stream its progress records, then its final record."""
        feed = ProgressFeed()

        async def runner() -> None:
            try:
                feed.push(await work(feed))
            except asyncio.CancelledError:
                feed.push(
                    stream_error_record(
                        503, "daemon_stopping", "the daemon stopped before this finished; retry"
                    )
                )
                raise
            except Exception as exc:
                feed.push(error_record(exc))
            finally:
                feed.close()

        task = asyncio.create_task(runner())
        background.add(task)
        task.add_done_callback(background.discard)
        return _ndjson(feed.lines())

    def tenant_of(request: Request) -> str:
        header = request.headers.get("authorization", "")
        local = request.scope.get("client") is None or request.scope["client"][0] in ("", None)
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized("Authorization header must be 'Bearer <api key>'")
            tenant = auth.tenant_for(store, key.strip())
            if tenant is None:
                raise Unauthorized("invalid or revoked API key")
            return tenant
        if local:
            return LOCAL_TENANT
        raise Unauthorized(
            "an API key is required over TCP: send 'Authorization: Bearer <key>'"
            " (create one with `isorun keys create`)"
        )

    def endpoint(
        fn: Callable[[Request, str], Awaitable[Any]],
        *,
        status: int = 200,
        public: bool = False,
        head: Callable[[Request, str], Awaitable[Any]] | None = None,
        streams: bool = False,
    ) -> Handler:
        """A route's handler. Starlette answers HEAD with GET's handler and drops the body:
        a streaming GET would then run (a watch, an attach) until the client hung up, and
        hold its keep-alive connection meanwhile. Such a route answers HEAD with `head`,
        or refuses it (405) when it `streams` and has none."""

        async def handler(request: Request) -> Response:
            try:
                tenant = "" if public else tenant_of(request)
                run = fn
                if request.method == "HEAD" and (head is not None or streams):
                    if head is None:
                        refused = error_response(
                            405,
                            "method_not_allowed",
                            f"HEAD is not allowed on {request.url.path}: its GET is a stream",
                        )
                        refused.headers["allow"] = "GET"
                        return refused
                    run = head
                result = await run(request, tenant)
                if isinstance(result, Response):
                    return result
                # rendered here: a value it cannot encode is an error record, not a bare 500
                return JSONResponse(result, status_code=status)
            except Exception as exc:
                sandbox_id = request.path_params.get("sid")
                if sandbox_id is None:
                    return map_error(exc)
                # its tenant was checked: only an agent op of its sandbox loses a connection
                return map_error(await manager.explain(sandbox_id, exc))

        return handler

    def admin(tenant: str, what: str) -> None:
        """Refuse a tenant key `what` (say, "removing images"): it is the local admin's."""
        if tenant != LOCAL_TENANT:
            raise Forbidden(
                f"{what} is for the local administrator (on the daemon's unix socket), not "
                "for an API key"
            )

    # --- system ------------------------------------------------------------------------

    async def health(request: Request, tenant: str) -> Any:
        # how often a silent NDJSON stream carries a keepalive: clients time streams by it
        return {"ok": True, "version": __version__, "stream_keepalive_s": cfg.stream_keepalive_s}

    async def openapi(request: Request, tenant: str) -> Any:
        from isorun.daemon.openapi import build_spec

        return build_spec()

    async def info(request: Request, tenant: str) -> Any:
        vcpus, memory_mib = manager.allocated()  # as the capacity check counts them
        return {
            "version": __version__,
            "tenant": tenant,
            "capacity": {
                "host_cpus": cfg.host_cpus,
                "host_mem_mib": cfg.host_mem_mib,
                "cpu_overcommit": cfg.cpu_overcommit,
                "mem_overcommit": cfg.mem_overcommit,
                "vcpus_allocated": vcpus,
                "memory_mib_allocated": memory_mib,
            },
            "price_per_vcpu_hour": cfg.price_per_vcpu_hour,
        }

    # --- sandboxes ---------------------------------------------------------------------

    async def create_sandbox(request: Request, tenant: str) -> Any:
        req = await parse(request, CreateSandbox)
        # A sandbox whose id never reached its client (it gave up, timed out or was
        # interrupted while the image was built or the VM booted) is not left running, unowned,
        # until its timeout: it is destroyed at once (end_reason "abandoned").
        if not _query_flag(request, "progress"):
            row = await manager.create(tenant, req)
            if await request.is_disconnected():
                await manager.abandon(row.id)
            return row.public()

        # ?progress=1: NDJSON progress of the image pull/build and the boot, then the sandbox.
        # The pull/build runs on when the client goes away (it fills the cache); the VM not.
        async def work(feed: ProgressFeed) -> dict[str, Any]:
            row = await manager.create(tenant, req, on_progress=feed.push)
            if feed.detached:
                await manager.abandon(row.id)
            return {"type": "sandbox", "sandbox": row.public()}

        return _progress_stream(work)

    async def list_sandboxes(request: Request, tenant: str) -> Any:
        meta: dict[str, str] = {}
        for k, v in request.query_params.multi_items():
            if k.startswith("metadata."):
                meta[k[len("metadata.") :]] = v
            elif k == "metadata":
                key, sep, val = v.partition("=")
                if not sep:
                    raise ApiError("metadata filter must be 'key=value'", code="invalid")
                meta[key] = val
            elif k != "all":
                raise ApiError(
                    f"unknown query parameter {k!r}; use metadata.KEY=VALUE or all=1",
                    code="invalid",
                )
        include_ended = _query_flag(request, "all")
        rows = manager.list(tenant, meta, include_ended)
        return {"sandboxes": [r.public() for r in rows]}

    async def get_sandbox(request: Request, tenant: str) -> Any:
        return manager.row(tenant, request.path_params["sid"]).public()

    async def kill_sandbox(request: Request, tenant: str) -> Any:
        return await manager.kill(tenant, request.path_params["sid"])

    async def set_timeout(request: Request, tenant: str) -> Any:
        req = await parse(request, SetTimeout)
        return manager.set_timeout(tenant, request.path_params["sid"], req.sandbox_timeout).public()

    async def logs(request: Request, tenant: str) -> Any:
        sid = request.path_params["sid"]
        manager.row(tenant, sid)
        live = manager.live.get(sid)
        # an ended sandbox's is what was kept when it ended: why it died is often there
        text = (
            live.vm.console.tail(CONSOLE_KEPT) if live is not None else manager.store.console(sid)
        )
        return Response(text, media_type="text/plain; charset=utf-8")

    async def metrics(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        u = live.vm.usage()
        guest = await live.vm.agent.metrics()
        return {
            "cpu_ms": u.cpu_ms,
            "mem_peak_bytes": u.mem_peak_bytes,
            "uptime_ms": u.uptime_ms,
            "guest": guest,
        }

    # --- processes ---------------------------------------------------------------------

    def _stream(
        live: Live,
        run: Callable[[Emit, Push], Awaitable[dict[str, Any]]],
        cancel_on_disconnect: bool,
    ) -> StreamingResponse:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        detached = False

        def push(rec: dict[str, Any]) -> None:
            if not detached:
                q.put_nowait(rec)

        room = asyncio.Event()

        async def emit(kind: str, data: bytes) -> None:
            while not detached and q.qsize() >= STREAM_BACKLOG:
                room.clear()
                await room.wait()
            if not detached:
                q.put_nowait({"type": kind, "data": base64.b64encode(data).decode()})

        async def runner() -> None:
            try:
                final = await run(emit, push)
                if not detached:
                    q.put_nowait(final)
            except asyncio.CancelledError:
                if not detached:
                    why = f" ({live.end_reason})" if live.end_reason else ""
                    q.put_nowait(
                        stream_error_record(410, "sandbox_ended", f"the sandbox ended{why}")
                    )
                raise
            except Exception as exc:
                q.put_nowait(error_record(await manager.explain(live.row.id, exc)))
            finally:
                q.put_nowait(None)

        task = live.spawn(runner())

        async def body() -> AsyncIterator[bytes]:
            nonlocal detached
            try:
                while True:
                    item = await q.get()
                    room.set()
                    if item is None:
                        return
                    yield (json.dumps(item, separators=(",", ":")) + "\n").encode()
            finally:
                detached = True
                room.set()
                if cancel_on_disconnect and not task.done():
                    task.cancel()

        return _ndjson(body())

    def _exit_record(r: ExecResult) -> dict[str, Any]:
        return {
            "type": "exit",
            "proc_id": r.proc_id,
            "exit_code": r.exit_code,
            "signal": r.signal,
            "timed_out": r.timed_out,
            "duration_ms": r.duration_ms,
        }

    async def exec_(request: Request, tenant: str) -> Any:
        req = await parse(request, ExecRequest)
        live = manager.get_live(tenant, request.path_params["sid"])
        pty = (req.pty.rows, req.pty.cols) if req.pty else None
        if req.background:
            proc_id, pid = await _spawn(
                live,
                {"cmd": req.cmd} if req.cmd is not None else {"argv": req.argv},
                env=req.env,
                cwd=req.cwd,
                user=req.user,
                timeout=req.timeout,
                pty=pty,
                tag=req.tag,
                stdin=req.open_stdin,
            )
            return {"proc_id": proc_id, "pid": pid}
        stdin: bytes | None = None
        if req.stdin is not None:
            try:
                stdin = base64.b64decode(req.stdin, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(f"stdin must be base64: {exc}", status=422, code="invalid") from exc

        async def run(emit: Emit, push: Push) -> dict[str, Any]:
            def started(proc_id: str, pid: int) -> None:
                push({"type": "start", "proc_id": proc_id, "pid": pid})

            r = await live.vm.agent.exec(
                req.cmd,
                argv=req.argv,
                env=req.env or None,
                cwd=req.cwd,
                user=req.user,
                timeout=req.timeout,
                stdin=stdin,
                pty=pty,
                on_stdout=lambda b: emit("stdout", b),
                on_stderr=lambda b: emit("stderr", b),
                on_start=started,
                capture=False,
                tag=req.tag,
            )
            return _exit_record(r)

        # A client that goes away does not stop the command: it runs on, its output stays
        # in the guest's ring, and GET .../processes/{proc_id}/stream replays it.
        return _stream(live, run, cancel_on_disconnect=False)

    async def list_procs(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        return {"processes": [_record(p) for p in await live.vm.agent.list_procs()]}

    async def connect_proc(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        offset = _query_int(request, "offset", 0, 0, 1 << 62)
        att = Attachment(offset=offset)
        await _known_proc(live, proc_id)

        async def run(emit: Emit, push: Push) -> dict[str, Any]:
            first = True
            at = offset  # where the next byte sent starts in the process's output
            told_gap = 0  # of att.gap_bytes, what gap records have said

            def gap() -> None:
                # The guest skipped the slow reader ahead (att.gap_bytes grew before the
                # output after it): say so where it happened, so a client's offset (which
                # counts what it got) stays the true position and a resume replays nothing.
                nonlocal at, told_gap
                if att.gap_bytes > told_gap:
                    lost, told_gap = att.gap_bytes - told_gap, att.gap_bytes
                    at += lost
                    push({"type": "gap", "lost": lost, "offset": at})

            def out(kind: str) -> Callable[[bytes], Awaitable[None]]:
                async def cb(b: bytes) -> None:
                    nonlocal first, at
                    if first:
                        first = False
                        at = att.offset
                        push({"type": "attached", "offset": att.offset, "lost": att.lost})
                    gap()
                    at += len(b)
                    await emit(kind, b)

                return cb

            r = await live.vm.agent.attach(
                proc_id,
                offset=offset,
                on_stdout=out("stdout"),
                on_stderr=out("stderr"),
                capture=False,
                attachment=att,
            )
            if not first:
                gap()  # one after the last output
            return {
                **_exit_record(r),
                "attached_offset": att.offset,
                "lost": att.lost,
                "gap_bytes": att.gap_bytes,
            }

        return _stream(live, run, cancel_on_disconnect=True)

    async def _known_proc(live: Live, proc_id: str) -> ProcInfo:
        if len(proc_id) <= 64:
            for p in await live.vm.agent.list_procs():
                if p.proc_id == proc_id:
                    return p
        raise NotFound(f"process {proc_id!r} not found in sandbox {live.row.id}")

    async def _spawn(
        live: Live,
        what: dict[str, Any],
        *,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        timeout: float | None,
        pty: tuple[int, int] | None,
        tag: str | None,
        stdin: bool,
    ) -> tuple[str, int]:
        """Start a background process (with a stdin pipe when asked: docs/protocol.md exec)."""
        proc_id, pid = await live.vm.agent.spawn(
            what.get("cmd"),
            argv=what.get("argv"),
            env=env or None,
            cwd=cwd,
            user=user,
            timeout=timeout,
            pty=pty,
            tag=tag,
            open_stdin=stdin,
        )
        if stdin:
            pipes.prune(manager.live.keys())
            pipes.started_with_stdin(live.row.id, proc_id)
        return proc_id, pid

    async def _running_proc(live: Live, proc_id: str) -> ProcInfo:
        p = await _known_proc(live, proc_id)
        if not p.running:
            raise Conflict(f"process {proc_id} has exited (exit code {p.exit_code})")
        return p

    async def send_stdin(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        data = await _raw_body(request, MAX_CHUNK, "stdin (send it in pieces of at most that size)")
        p = await _running_proc(live, proc_id)
        if not p.pty and not pipes.has_stdin(live.row.id, proc_id):
            raise Conflict(
                f"process {proc_id} has no open stdin: start it with 'open_stdin': true"
                " (background exec) or on a PTY; a closed stdin cannot be reopened"
            )
        pipe = pipes.get(live.row.id, proc_id) or pipes.open(
            live.row.id, proc_id, live.vm.agent, live.spawn
        )
        if not await pipe.write(data):
            raise await _stdin_ended(live, proc_id)
        return {"bytes": len(data)}

    async def _stdin_ended(live: Live, proc_id: str) -> ApiError:
        """Why a stdin pipe took no more: its sandbox ended (410 naming why), else its
        process exited."""
        return await manager.end_error(live.row.id) or Conflict(f"process {proc_id} has exited")

    async def close_stdin(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        p = await _running_proc(live, proc_id)
        pipe = pipes.get(live.row.id, proc_id)
        if p.pty:
            # On a terminal an end of input is a ^D in it, after what was sent before; the
            # terminal stays open for more (a shell reads on after its `cat` got the ^D).
            if pipe is None:
                await live.vm.agent.close_stdin(proc_id)
            elif not await pipe.write(pipe.terminal_eof()):
                raise await _stdin_ended(live, proc_id)
            return {"ok": True}
        if not pipes.has_stdin(live.row.id, proc_id):
            raise Conflict(
                f"process {proc_id} has no open stdin to close: it was started without "
                "'open_stdin': true, or its stdin is closed already"
            )
        if pipe is not None:
            if not await pipe.close():  # EOF after the bytes already queued
                raise await _stdin_ended(live, proc_id)
        else:
            await live.vm.agent.close_stdin(proc_id)
        pipes.stdin_closed(live.row.id, proc_id)
        return {"ok": True}

    async def resize(request: Request, tenant: str) -> Any:
        req = await parse(request, Resize)
        live = manager.get_live(tenant, request.path_params["sid"])
        proc_id = request.path_params["pid"]
        p = await _running_proc(live, proc_id)
        if not p.pty:
            raise Conflict(
                f"process {proc_id} has no terminal to resize: start it with a 'pty'"
                " (POST .../pty or exec with 'pty')"
            )
        await live.vm.agent.resize(proc_id, req.rows, req.cols)
        return {"ok": True}

    async def open_pty(request: Request, tenant: str) -> Any:
        req = await parse(request, PtyRequest)
        live = manager.get_live(tenant, request.path_params["sid"])
        if req.argv is not None:
            what: dict[str, Any] = {"argv": req.argv}
        else:
            what = {"cmd": req.cmd or DEFAULT_SHELL}
        proc_id, pid = await _spawn(
            live,
            what,
            env={"TERM": "xterm-256color", **req.env},
            cwd=req.cwd,
            user=req.user,
            timeout=req.timeout,
            pty=(req.rows, req.cols),
            tag="pty",
            stdin=False,
        )
        return {"proc_id": proc_id, "pid": pid}

    async def kill_proc(request: Request, tenant: str) -> Any:
        req = await parse(request, KillProcess)
        live = manager.get_live(tenant, request.path_params["sid"])
        await _known_proc(live, request.path_params["pid"])
        code, sig = await live.vm.agent.kill(request.path_params["pid"], req.grace)
        return {"exit_code": code, "signal": sig}

    async def signal_proc(request: Request, tenant: str) -> Any:
        req = await parse(request, SignalProcess)
        live = manager.get_live(tenant, request.path_params["sid"])
        await _known_proc(live, request.path_params["pid"])
        await live.vm.agent.signal(request.path_params["pid"], req.signal)
        return {"ok": True}

    # --- files -------------------------------------------------------------------------

    async def read_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = _query_path(request)
        it = live.vm.agent.read_file(path)
        # Pull the first chunk now so a missing file is a 404, not a broken stream.
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = b""

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            try:
                if first:
                    yield first
                    sent = len(first)
                async for chunk in it:
                    yield chunk
                    sent += len(chunk)
            except IsorunError as exc:
                # a lost connection: have its sandbox's end (and why) recorded before the client,
                # seeing its download cut short, asks what became of the sandbox
                why = await manager.explain(live.row.id, exc)
                log.warning(
                    "GET files %s of sandbox %s broken off after %d bytes: %s",
                    path,
                    live.row.id,
                    sent,
                    why,
                )
                raise BrokenOff from exc
            finally:
                await it.aclose()

        return RawStream(body())

    async def head_file(request: Request, tenant: str) -> Any:
        """GET's status and headers without its body: the guest opens the file as for a
        read (the same errors) and sends none of it. Content-Length only when the guest
        says the file has bytes: a device or a /proc file reads as size 0 and is not."""
        live = manager.get_live(tenant, request.path_params["sid"])
        size = await live.vm.agent.file_size(_query_path(request))
        if size:
            return Response(media_type=RawStream.media_type, headers={"content-length": str(size)})
        return StreamingResponse(iter(()), media_type=RawStream.media_type)  # chunked, as GET

    async def write_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = _query_path(request, "mode", "append")
        # absent: an existing file keeps its mode, a new one gets 0644 (docs/protocol.md)
        mode = None if "mode" not in request.query_params else _query_mode(request)
        append = _query_flag(request, "append")
        n = await live.vm.agent.write_file(path, _chunks(request), mode=mode, append=append)
        return {"path": path, "bytes": n}

    async def list_files(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        depth = _query_int(request, "depth", 1, 1, 64)
        entries = await live.vm.agent.list(_query_path(request, "depth"), depth)
        return {"entries": [_record(e) for e in entries]}

    async def stat_file(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        return _record(await live.vm.agent.stat(_query_path(request)))

    async def mkdir(request: Request, tenant: str) -> Any:
        req = await parse(request, MkdirOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.mkdir(req.path, req.parents, req.mode)
        return {"ok": True}

    async def remove(request: Request, tenant: str) -> Any:
        req = await parse(request, RemoveOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.remove(req.path, req.recursive)
        return {"ok": True}

    async def rename(request: Request, tenant: str) -> Any:
        req = await parse(request, RenameOp)
        live = manager.get_live(tenant, request.path_params["sid"])
        await live.vm.agent.rename(req.src, req.dst)
        return {"ok": True}

    async def watch(request: Request, tenant: str) -> Any:
        live = manager.get_live(tenant, request.path_params["sid"])
        path = _query_path(request, "recursive")
        recursive = _query_flag(request, "recursive")
        # An agent from before watch_ready says nothing until a change, so a missing or
        # relative path would only show as an error record later: check it first (a newer
        # agent's open_watch fails for it itself).
        if "watch_ready" not in live.vm.agent.conn.features:
            await live.vm.agent.stat(path)
        # The response starts once the guest watches: a change the caller makes after its
        # 200 (the SDK's watch() returns at it) is reported.
        w = await live.vm.agent.open_watch(path, recursive)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for op, p in w:
                    yield (json.dumps({"type": "fs", "op": op, "path": p}) + "\n").encode()
            except IsorunError as exc:
                why = await manager.explain(live.row.id, exc)
                yield (json.dumps(error_record(why)) + "\n").encode()
            finally:
                w.close()

        return _ndjson(body())

    # --- usage, images, keys ---------------------------------------------------------------

    async def usage(request: Request, tenant: str) -> Any:
        def f(name: str) -> float | None:
            raw = request.query_params.get(name)
            if raw is None:
                return None
            try:
                v = float(raw)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):  # float() takes nan and inf, which match no record
                raise ApiError(f"{name}={raw!r} must be a unix timestamp", code="invalid")
            return v

        return {
            "price_per_vcpu_hour": cfg.price_per_vcpu_hour,
            **store.usage(tenant, f("since"), f("until")),
        }

    def tenant_image_json(tenant: str, img: Image) -> dict[str, Any] | None:
        """What a tenant is shown of a stored image: None for one known only by the host
        paths it was imported from, or one it could not be handed (the daemon's credentials
        may have fetched it from a registry the tenant may not name)."""
        names = names_for(tenant, img.names)
        if (img.names and not names) or not admits(
            pull_policy_for(tenant, cfg.tenant_registries), img
        ):
            return None
        return {**image_json(img), "names": names}

    async def images(request: Request, tenant: str) -> Any:
        shown = (tenant_image_json(tenant, i) for i in manager.images.list())
        return {"images": [i for i in shown if i is not None]}

    def _image_ref(request: Request) -> str:
        ref = request.query_params.get("ref", "")
        if not ref or len(ref) > 1024:
            raise ApiError(
                "give the image as ?ref=NAME (at most 1024 characters)", status=422, code="invalid"
            )
        return ref

    async def inspect_image(request: Request, tenant: str) -> Any:
        ref = _image_ref(request)
        try:
            refuse_host_path_image(tenant, ref, manager.images.parse(ref))
            img = manager.images.inspect(ref)
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        shown = tenant_image_json(tenant, img)
        if shown is None:
            raise NotFound(f"image {ref!r} not found")
        c = img.config
        # Holders are other tenants' sandboxes: say only whether the image is in use.
        return {
            **shown,
            "in_use": bool(manager.images.holders(img.digest)),
            "config": {
                "env": c.env,
                "working_dir": c.working_dir,
                "user": c.user,
                "entrypoint": c.entrypoint,
                "cmd": c.cmd,
            },
        }

    async def remove_image(request: Request, tenant: str) -> Any:
        admin(tenant, "removing images")
        ref = _image_ref(request)
        try:
            img = await manager.images.remove(ref)
        except ImageInUseError as exc:
            raise Conflict(f"image {ref!r} is in use: {exc}", code="image_in_use") from exc
        except ImageError as exc:
            raise image_api_error(ref, exc) from exc
        return {"removed": img.digest, "freed_bytes": img.disk_bytes}

    async def gc_images(request: Request, tenant: str) -> Any:
        admin(tenant, "garbage-collecting images")
        all_unused = _query_flag(request, "all")
        report = await manager.images.gc(all_unused=all_unused)
        return {"removed": report.removed, "freed_bytes": report.freed_bytes}

    async def images_disk_usage(request: Request, tenant: str) -> Any:
        admin(tenant, "seeing the image store's disk usage")
        du = manager.images.disk_usage()
        return {"images": du.images, "image_bytes": du.image_bytes, "tmp_bytes": du.tmp_bytes}

    async def pull_image(request: Request, tenant: str) -> Any:
        req = await parse(request, PullImage)
        try:
            parsed = manager.images.parse(req.image)  # a malformed reference is a plain 400
        except ImageError as exc:
            raise image_api_error(req.image, exc) from exc
        refuse_host_path_image(tenant, req.image, parsed)

        async def work(feed: ProgressFeed) -> dict[str, Any]:
            def progress(ev: ProgressEvent) -> None:
                feed.push(progress_record(ev))

            try:
                img = await manager.images.ensure(
                    req.image,
                    pull=req.pull,
                    progress=progress,
                    policy=pull_policy_for(tenant, cfg.tenant_registries),
                )
            except ImageError as exc:
                raise image_api_error(req.image, exc) from exc
            return {"type": "image", "image": image_json(img)}

        return _progress_stream(work)

    async def create_key(request: Request, tenant: str) -> Any:
        admin(tenant, "managing API keys")
        req = await parse(request, CreateKey)
        return auth.create_key(store, req.tenant_id, req.name)

    async def list_keys(request: Request, tenant: str) -> Any:
        admin(tenant, "managing API keys")
        return {"keys": store.list_keys()}

    async def revoke_key(request: Request, tenant: str) -> Any:
        admin(tenant, "managing API keys")
        if not store.revoke_key(request.path_params["kid"]):
            raise NotFound(f"API key {request.path_params['kid']!r} not found")
        return {"ok": True}

    S = "/v1/sandboxes/{sid}"
    P = S + "/processes/{pid}"
    routes = [
        Route("/v1/health", endpoint(health, public=True)),
        Route("/openapi.json", endpoint(openapi, public=True)),
        Route("/v1/info", endpoint(info)),
        Route("/v1/sandboxes", endpoint(create_sandbox, status=201), methods=["POST"]),
        Route("/v1/sandboxes", endpoint(list_sandboxes), methods=["GET"]),
        Route(S, endpoint(get_sandbox), methods=["GET"]),
        Route(S, endpoint(kill_sandbox), methods=["DELETE"]),
        Route(S + "/timeout", endpoint(set_timeout), methods=["POST"]),
        Route(S + "/logs", endpoint(logs), methods=["GET"]),
        Route(S + "/metrics", endpoint(metrics), methods=["GET"]),
        Route(S + "/exec", endpoint(exec_), methods=["POST"]),
        Route(S + "/processes", endpoint(list_procs), methods=["GET"]),
        Route(S + "/processes/{pid}/stream", endpoint(connect_proc, streams=True), methods=["GET"]),
        Route(S + "/processes/{pid}/kill", endpoint(kill_proc), methods=["POST"]),
        Route(S + "/processes/{pid}/signal", endpoint(signal_proc), methods=["POST"]),
        Route(P + "/stdin", endpoint(send_stdin), methods=["POST"]),
        Route(P + "/stdin/close", endpoint(close_stdin), methods=["POST"]),
        Route(P + "/resize", endpoint(resize), methods=["POST"]),
        Route(S + "/pty", endpoint(open_pty, status=201), methods=["POST"]),
        Route(S + "/files", endpoint(read_file, head=head_file), methods=["GET"]),
        Route(S + "/files", endpoint(write_file), methods=["PUT"]),
        Route(S + "/files/list", endpoint(list_files), methods=["GET"]),
        Route(S + "/files/stat", endpoint(stat_file), methods=["GET"]),
        Route(S + "/files/watch", endpoint(watch, streams=True), methods=["GET"]),
        Route(S + "/files/mkdir", endpoint(mkdir), methods=["POST"]),
        Route(S + "/files/remove", endpoint(remove), methods=["POST"]),
        Route(S + "/files/rename", endpoint(rename), methods=["POST"]),
        Route("/v1/usage", endpoint(usage), methods=["GET"]),
        Route("/v1/images", endpoint(images), methods=["GET"]),
        Route("/v1/images/pull", endpoint(pull_image), methods=["POST"]),
        Route("/v1/images/inspect", endpoint(inspect_image), methods=["GET"]),
        Route("/v1/images", endpoint(remove_image), methods=["DELETE"]),
        Route("/v1/images/gc", endpoint(gc_images), methods=["POST"]),
        Route("/v1/images/usage", endpoint(images_disk_usage), methods=["GET"]),
        Route("/v1/keys", endpoint(create_key, status=201), methods=["POST"]),
        Route("/v1/keys", endpoint(list_keys), methods=["GET"]),
        Route("/v1/keys/{kid}", endpoint(revoke_key), methods=["DELETE"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            for t in list(background):
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await manager.stop()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "not_found", f"no route {request.method} {request.url.path}")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        )

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method}
    )


async def _raw_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refused (413) as soon as it is known to be over `limit` bytes: from
    its Content-Length, else once that many bytes have arrived."""

    def too_large(size: str) -> ApiError:
        return ApiError(
            f"request body is {size} bytes; the limit for {what} is {limit} bytes",
            status=413,
            code="too_large",
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"over {limit}")
        parts.append(chunk)
    return b"".join(parts)


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
