"""Strict field extraction from guest JSON: wrong types or absurd values are violations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from isorun.errors import ProtocolError
from isorun.fsnames import surrogate_problem

_MISSING: Any = object()
_MAX_STR = 65536
_INT_LIMIT = 1 << 63


def _get(obj: dict[str, Any], key: str, default: Any) -> Any:
    if key in obj:
        return obj[key]
    if default is _MISSING:
        raise ProtocolError(f"guest answer lacks field '{key}'")
    return default


def as_str(obj: dict[str, Any], key: str, default: Any = _MISSING) -> str:
    return _text(_get(obj, key, default), f"field '{key}'")


def _text(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > _MAX_STR:
        raise ProtocolError(f"guest {what} is not a string of at most {_MAX_STR} chars")
    if not v.isascii():
        try:  # a lone surrogate (a "\udc80" escape) is no text: it fails every encoder later
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(f"guest {what} holds a lone surrogate") from None
    return v


def as_name(obj: dict[str, Any], key: str, default: Any = _MISSING) -> str:
    """A file name or path: text, where a byte of it that is not UTF-8 is the lone surrogate
    U+DC80..U+DCFF (the agent's "\\udcXX" escape; Python's surrogateescape, so
    `os.fsencode` gives the bytes back). Any other lone surrogate stands for no byte."""
    v = _get(obj, key, default)
    if not isinstance(v, str) or len(v) > _MAX_STR:
        raise ProtocolError(f"guest field '{key}' is not a string of at most {_MAX_STR} chars")
    if problem := surrogate_problem(v):
        raise ProtocolError(f"guest field '{key}' {problem}")
    return v


def as_int(obj: dict[str, Any], key: str, default: Any = _MISSING) -> int:
    v = _get(obj, key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not -_INT_LIMIT <= v < _INT_LIMIT:
        raise ProtocolError(f"guest field '{key}' is not a 64-bit integer")
    return v


def as_count(obj: dict[str, Any], key: str, default: Any = _MISSING) -> int:
    """A size, offset or count: a 64-bit integer that is not negative."""
    v = as_int(obj, key, default)
    if v < 0:
        raise ProtocolError(f"guest field '{key}' is negative ({v})")
    return v


def as_opt_int(obj: dict[str, Any], key: str) -> int | None:
    if obj.get(key) is None:
        return None
    return as_int(obj, key)


def as_bool(obj: dict[str, Any], key: str, default: Any = _MISSING) -> bool:
    v = _get(obj, key, default)
    if not isinstance(v, bool):
        raise ProtocolError(f"guest field '{key}' is not a boolean")
    return v


def as_float(obj: dict[str, Any], key: str, default: Any = _MISSING) -> float:
    v = _get(obj, key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(f"guest field '{key}' is not a number")
    try:  # finite once it is a float: the JSON decoder refuses NaN, Infinity and 1e999
        return float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise ProtocolError(f"guest field '{key}' is out of range") from None


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    path: str
    type: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    link: str | None = None


_TYPES = frozenset({"file", "dir", "symlink", "other"})
NAME_MAX = 255  # Linux's, in bytes: never more characters
# a listed path: the path asked for (PATH_MAX) and up to 64 levels of names under it
LISTED_PATH_MAX = 4096 + 64 * (NAME_MAX + 1)


def parse_entry(raw: object) -> FileEntry:
    if not isinstance(raw, dict):
        raise ProtocolError("file entry from guest is not an object")
    kind = as_str(raw, "type")
    if kind not in _TYPES:
        raise ProtocolError(f"file entry type '{kind[:40]}' is not one of {sorted(_TYPES)}")
    link = raw.get("link")
    name, path = as_name(raw, "name"), as_name(raw, "path")
    if len(name) > NAME_MAX or len(path) > LISTED_PATH_MAX:
        raise ProtocolError(
            f"file entry name or path from guest is longer than a name ({NAME_MAX}) or a "
            f"listed path ({LISTED_PATH_MAX}) can be"
        )
    return FileEntry(
        name=name,
        path=path,
        type=kind,
        size=as_count(raw, "size"),
        mode=as_int(raw, "mode"),
        mtime_ns=as_int(raw, "mtime_ns", default=0),
        uid=as_count(raw, "uid", default=0),
        gid=as_count(raw, "gid", default=0),
        link=as_name(raw, "link") if link is not None else None,
    )


@dataclass(frozen=True, slots=True)
class ProcInfo:
    proc_id: str
    pid: int
    argv: list[str]  # cut to its first 2 KiB or so in a listing; argv_truncated says
    tag: str
    pty: bool
    running: bool
    exit_code: int | None
    signal: int | None
    started_unix_ms: int
    output_bytes: int
    argv_truncated: bool = False


# What a listing shows of a process's argv, each argument counted with 3 bytes of JSON
# quotes and comma: the agent cuts there (listedArgvBytes), and so does the host, whatever
# the guest sends: 1,024 two-byte arguments for each of 8,192 processes made 40 MiB on
# the wire into ~600 MiB of Python strings.
LISTED_ARGV_BYTES = 2048


def _listed_argv(argv: list[object]) -> tuple[list[str], bool]:
    out: list[str] = []
    left = LISTED_ARGV_BYTES
    for a in argv:
        text = _text(a, "process argv entry")
        if left <= 3:
            return out, True
        left -= 3
        if len(text) > left:
            return [*out, text[:left]], True
        left -= len(text)
        out.append(text)
    return out, False


# The agent refuses a longer tag (exec.go) and names processes "p1", "p2", ...: longer is
# a guest making each listed process hold up to 256 KiB of strings (64 K characters at 4
# bytes each, one outside the BMP).
TAG_MAX = 1024
PROC_ID_MAX = 64


def _bounded(raw: dict[str, Any], key: str, most: int, default: Any = _MISSING) -> str:
    text = as_str(raw, key, default)
    if len(text) > most:
        raise ProtocolError(
            f"process {key} from guest is {len(text)} characters, over the {most} an agent keeps"
        )
    return text


def parse_proc(raw: object) -> ProcInfo:
    if not isinstance(raw, dict):
        raise ProtocolError("process entry from guest is not an object")
    argv = raw.get("argv") or []
    if not isinstance(argv, list):
        raise ProtocolError("process argv from guest is not a list of strings")
    shown, cut = _listed_argv(argv)
    return ProcInfo(
        proc_id=_bounded(raw, "proc_id", PROC_ID_MAX),
        pid=as_count(raw, "pid"),
        argv=shown,
        tag=_bounded(raw, "tag", TAG_MAX, default=""),
        pty=as_bool(raw, "pty", default=False),
        running=as_bool(raw, "running"),
        exit_code=as_opt_int(raw, "exit_code"),
        signal=as_opt_int(raw, "signal"),
        started_unix_ms=as_int(raw, "started_unix_ms", default=0),
        output_bytes=as_count(raw, "output_bytes", default=0),
        argv_truncated=cut or as_bool(raw, "argv_truncated", default=False),
    )
