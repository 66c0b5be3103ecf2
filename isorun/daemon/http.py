"""Requests and responses of the HTTP API: bodies parsed and bounded, query parameters
checked, errors mapped to status codes and records."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import pydantic_core
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from isorun.agent import FileEntry, ProcInfo
from isorun.daemon.errors import ApiError
from isorun.daemon.models import (
    PATH_MAX_CHARS,
    ExecRequest,
)
from isorun.daemon.store import StateError, StateFullError
from isorun.errors import (
    ChannelClosedError,
    ConfigError,
    ConsumerTooSlowError,
    FileNotFoundInGuest,
    GuestError,
    IsorunError,
    RequestTooLargeError,
)
from isorun.images import Image

log = logging.getLogger("isorund.api")
M = TypeVar("M", bound=BaseModel)
# A JSON body is at most 1 MiB, but exec's: its `stdin` (base64, up to 64 MiB) may make it
# large. Beyond 1 MiB a body may hold only a few JSON items: parsing is synchronous on the
# event loop, and 90 MiB of tiny items took ~9 s of it and 1.1 GiB (a long string: ~0.1 s).
JSON_BODY_LIMIT = 1 << 20
EXEC_BODY_LIMIT = 96 << 20
LARGE_BODY_MAX_ITEMS = 1 << 16
_BODY_LIMITS: dict[type[BaseModel], int] = {ExecRequest: EXEC_BODY_LIMIT}
_COUNT_SLICE = 4 << 20  # ~5 ms of counting
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


class JSONText(JSONResponse):
    """JSON as Starlette writes it (UTF-8), but a lone surrogate (a byte of a file name that
    is not UTF-8, as Python holds it) is written as its "\\udcXX" escape, which UTF-8
    cannot encode: the client reads back the name it can send again."""

    def render(self, content: Any) -> bytes:
        # one pass: only a surrogate fails UTF-8, and backslashreplace writes it as \udcXX
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONText({"error": {"code": code, "message": message}}, status_code=status)


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
    raw = await raw_body(
        request, _BODY_LIMITS.get(model, JSON_BODY_LIMIT), f"a {model.__name__} JSON body"
    )
    if len(raw) <= JSON_BODY_LIMIT:
        return _validated(_loads(raw), model)
    # A large body (exec's long `stdin`): counted in slices between which other requests
    # run, and parsed by pydantic's parser, ~3x faster than json's (64 MiB: 40 ms, not
    # 115). Each is one C call that holds the GIL, so a worker thread would not help.
    if (items := await _json_items(raw)) > LARGE_BODY_MAX_ITEMS:
        raise ApiError(
            f"request body is {len(raw)} bytes with about {items} JSON items; past "
            f"{JSON_BODY_LIMIT} bytes only a long `stdin` may make a body large (at most "
            f"{LARGE_BODY_MAX_ITEMS} items): send big input as a file or to an open stdin",
            status=413,
            code="too_large",
        )
    try:
        data = pydantic_core.from_json(raw)
    except ValueError:
        # what it refuses (a lone surrogate's escape, a BOM) json may take, and json's
        # error says what is wrong the way small bodies' do
        data = _loads(raw)
    return _validated(data, model)


def _loads(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(
            "request body is not valid JSON: it nests too deeply", code="malformed_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", code="malformed_json") from exc


def _validated(data: Any, model: type[M]) -> M:
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


async def _json_items(raw: bytes) -> int:
    """An upper bound of the items of a JSON text, counted in C at memory speed: every
    value but the first follows a `,` or `:` or opens with `[`/`{` (base64 has none)."""
    total = 0
    for start in range(0, len(raw), _COUNT_SLICE):
        end = start + _COUNT_SLICE
        total += sum(raw.count(c, start, end) for c in (b",", b":", b"[", b"{"))
        await asyncio.sleep(0)  # let other requests run between slices
    return total


_INTEGER = re.compile(r"-?[0-9]{1,20}")


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # digits only: int() also takes "1_0", " 5", "+2" and other scripts' digits
    if not _INTEGER.fullmatch(raw):
        raise ApiError(f"query parameter {name}={raw!r} is not an integer", code="invalid")
    v = int(raw)
    if not lo <= v <= hi:
        raise ApiError(f"query parameter {name}={v} must be between {lo} and {hi}", code="invalid")
    return v


def query_mode(request: Request) -> int:
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


def query_flag(request: Request, name: str) -> bool:
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


def only_params(request: Request, *takes: str) -> None:
    """Refuse a query parameter the route does not take: a misspelt one (`apend=1`,
    `sinse=`) would otherwise be ignored, and the answer look right."""
    seen: set[str] = set()
    for k, _ in request.query_params.multi_items():
        if k not in takes:
            took = f"this route takes {', '.join(takes)}" if takes else "this route takes none"
            raise ApiError(f"unknown query parameter {k!r}; {took}", code="invalid")
        if k in seen:  # which one counts would be a guess (Starlette keeps the last)
            raise ApiError(f"query parameter {k!r} is given more than once", code="invalid")
        seen.add(k)


def query_path(request: Request, *others: str) -> str:
    """?path= of a files route, which takes no query parameter but `path` and `others`."""
    only_params(request, "path", *others)
    p = request.query_params.get("path")
    if p and "\ufffd" in p:
        # Starlette put U+FFFD for what was no UTF-8 (a Latin-1 name, %E9), which would name
        # another file: such a byte is taken as Python holds it, the lone surrogate
        # U+DC80+byte (os.fsdecode), which the guest agent turns back into the byte
        p = _raw_query_param(request, "path")
    if not p or "\x00" in p or len(p) > PATH_MAX_CHARS:
        raise ApiError(
            "query parameter 'path' is required: a path in the sandbox (absolute, or relative"
            f" to its working directory), at most {PATH_MAX_CHARS} bytes, without NUL",
            code="invalid",
        )
    return p


def _raw_query_param(request: Request, name: str) -> str | None:
    """The last `name` of the query string, with the bytes that are not UTF-8 once
    percent-decoded kept as surrogates (as Starlette's query_params keeps the last)."""
    pairs = parse_qsl(
        request.scope["query_string"].decode("latin-1"),
        keep_blank_values=True,
        errors="surrogateescape",
    )
    values = [v for k, v in pairs if k == name]
    return values[-1] if values else None


Handler = Callable[[Request], Awaitable[Response]]
Emit = Callable[[str, bytes], Awaitable[None]]
# Output records a stream may hold for a slow HTTP reader; past that the exec waits, which
# stops returning credit to the guest, which blocks the guest process: memory stays bounded.
STREAM_BACKLOG = 64
# ... and their bytes (base64): a record may join 64 KiB of output, so 64 of them held ~6 MiB
# for each stalled reader.
STREAM_BACKLOG_BYTES = 1 << 20
Push = Callable[[dict[str, Any]], None]


# The shell of `POST .../pty` without a command: bash when the image has it, else sh.
DEFAULT_SHELL = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"


def error_record(exc: BaseException) -> dict[str, Any]:
    resp = map_error(exc)
    body = json.loads(bytes(resp.body))
    return stream_error_record(resp.status_code, body["error"]["code"], body["error"]["message"])


def entry_record(entry: FileEntry | ProcInfo) -> dict[str, Any]:
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


async def raw_body(request: Request, limit: int, what: str) -> bytes:
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


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
