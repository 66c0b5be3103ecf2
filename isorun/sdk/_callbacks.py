"""User callbacks (on_stdout, on_stderr, on_progress) called the same way by every decoder.

The async SDK awaits what an `async def` callback returns, in order, before reading on; the
sync SDK cannot, and says so instead of dropping the call (a coroutine never awaited does
nothing but warn).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
# Set on what a user callback raised: even an SDK error (the callback's own request failed)
# is then the caller's, not the stream's (see _core.abandoned).
_RAISED_BY_A_CALLBACK = "_isorun_raised_by_a_callback"


def _mark(exc: BaseException) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _RAISED_BY_A_CALLBACK, True)


def raised_by_a_callback(exc: BaseException) -> bool:
    return getattr(exc, _RAISED_BY_A_CALLBACK, False) is True


def call_back(
    name: str, cb: Callable[[T], object], arg: T, pending: list[Awaitable[object]] | None
) -> None:
    """Call `cb(arg)`. `pending` (the async face's) collects an awaitable it returns, for
    `run_pending`; without it (the sync face) one is closed and refused."""
    try:
        r = cb(arg)
    except BaseException as exc:
        _mark(exc)
        raise
    if not inspect.isawaitable(r):
        return
    if pending is not None:
        pending.append(r)
        return
    if inspect.iscoroutine(r):
        r.close()
    raise TypeError(
        f"{name} returned an awaitable, which the sync SDK cannot await: pass a plain "
        "function, or use the async SDK (AsyncSandbox, AsyncImages)"
    )


async def run_pending(pending: list[Awaitable[object]] | None) -> None:
    """Await what callbacks returned so far, in order."""
    while pending:
        try:
            await pending.pop(0)
        except BaseException as exc:
            _mark(exc)
            raise
