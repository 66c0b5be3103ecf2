"""SDK errors, rooted at `isorun.errors.IsorunError`; HTTP errors are mapped by status."""

from __future__ import annotations

from typing import Any

from isorun.errors import IsorunError


class ApiError(IsorunError):
    """The daemon refused a request; `status` and `code` say why, the message what to change."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AuthError(ApiError):
    """Missing, invalid or revoked API key."""


class NotFoundError(ApiError):
    """No such sandbox, process, file or image (or it belongs to another API key)."""


class SandboxEndedError(ApiError):
    """The sandbox has ended (killed, timed out, or its VM died)."""


class CapacityError(ApiError):
    """The host has no room for the sandbox; destroy some or ask for less."""


class SandboxClosedError(IsorunError, RuntimeError):
    """This `Sandbox` object was closed (`close()`); the sandbox itself may run on: get a new
    handle with `Sandbox.connect(id)`. (A sandbox it destroyed raises SandboxEndedError.)"""


class SandboxNotStartedError(IsorunError, RuntimeError):
    """An `AsyncSandbox` constructed but never started: `await AsyncSandbox.create(...)`,
    or `async with AsyncSandbox(...) as sb`."""


class DaemonUnavailable(IsorunError):
    """No daemon answers at the API URL (and none could be started), or the connection to it
    was lost. Lost under a process's output stream, `proc_id` names the process, which runs
    on, and `offset` the output delivered so far: `wait(offset=...)` follows it from there."""

    def __init__(self, message: str, *, proc_id: str = "", offset: int | None = None) -> None:
        super().__init__(message)
        self.proc_id = proc_id
        self.offset = offset


class CommandFailed(IsorunError):
    """`exec(..., check=True)` and the command exited non-zero; `.result` holds its output."""

    def __init__(self, result: Any) -> None:
        if getattr(result, "timed_out", False):
            what = "command timed out and was killed"
        elif result.exit_code is None:
            what = "command was killed"
        else:
            what = f"command exited with {result.exit_code}"
        super().__init__(
            what
            + (f" (signal {result.signal})" if result.signal else "")
            + (": " + result.stderr.strip()[-500:] if result.stderr else "")
        )
        self.result = result


def error_for(status: int, body: Any) -> ApiError:
    code, message = "", f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", ""))
        message = str(body["error"].get("message", message))
    cls: type[ApiError] = ApiError
    if status == 401:
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 410:
        cls = SandboxEndedError
    elif status == 503 and code == "capacity":
        cls = CapacityError
    return cls(message, status, code)


def stream_error(rec: dict[str, Any]) -> ApiError:
    """The exception for an NDJSON `{type: error, code, message}` record."""
    code = str(rec.get("code") or "")
    # The status the error would have had as a plain response, sent by the daemon.
    status = rec.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        status = 500
    return error_for(
        status,
        {"error": {"code": code, "message": str(rec.get("message") or "stream error")}},
    )
