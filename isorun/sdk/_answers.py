"""What the daemon's answers must look like for the SDK to use them: JSON as RFC 8259 has it
(Python's json also takes NaN and Infinity, which then fail far from the answer as
OverflowError or ValueError), objects holding the fields the SDK reads, of their types. An
answer that is not (a proxy's, another daemon's) raises ApiError `unexpected_answer` naming
the field, never a raw KeyError, TypeError or AttributeError."""

from __future__ import annotations

import json
from typing import Any, NoReturn, TypeGuard

from isorun.sdk.errors import ApiError

# A field kind of `shaped`: a non-empty str that can be one URL path segment (a sandbox or
# process id; one that cannot would address another route, or none).
ID = "id"
Kind = type | tuple[type, ...] | str


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def loads(data: str | bytes) -> Any:
    """json.loads refusing NaN, Infinity and -Infinity (a ValueError, as for any non-JSON)."""
    return json.loads(data, parse_constant=_no_constant)


def is_int(v: object) -> TypeGuard[int]:
    """An int, not a bool (True is an int to Python, never a count to the daemon)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_id(v: object) -> TypeGuard[str]:
    return isinstance(v, str) and bool(v) and "/" not in v and v not in (".", "..")


def fits(v: object, kind: Kind) -> bool:
    if kind == ID:
        return is_id(v)
    if kind is int:
        return is_int(v)
    assert not isinstance(kind, str)
    return isinstance(v, kind)


def _kind_name(kind: Kind) -> str:
    if kind == ID:
        return "an id"
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    assert isinstance(kind, type)
    return kind.__name__


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def unexpected(where: str, what: str) -> ApiError:
    """The error for an answer the SDK cannot use: `where` asked, `what` is wrong with it."""
    return ApiError(
        f"{where} was answered with {what}: is api_url (or ISORUN_API_URL) an isorun daemon, "
        "of a version this SDK knows?",
        502,
        "unexpected_answer",
    )


def shaped(body: Any, where: str, what: str = "an answer", **shape: Kind) -> dict[str, Any]:
    """`body` if it is an object holding each field of `shape` with a value of its kind."""
    if not isinstance(body, dict):
        raise unexpected(where, f"{what} that is {type(body).__name__}, not an object")
    for key, kind in shape.items():
        if key not in body:
            raise unexpected(where, f"{what} without its {key!r}")
        if not fits(body[key], kind):
            raise unexpected(
                where, f"{what} whose {key!r} is {_short(body[key])}, not {_kind_name(kind)}"
            )
    return body
