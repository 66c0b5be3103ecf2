"""The Python SDK: `Sandbox` (sync) and `AsyncSandbox` over one shared core (`_core`)."""

from isorun.sdk._progress import PullProgress
from isorun.sdk._records import ExecResult, FileInfo, ProcessInfo, Usage
from isorun.sdk.errors import (
    ApiError,
    AuthError,
    CapacityError,
    CommandFailed,
    DaemonUnavailable,
    NotFoundError,
    SandboxClosedError,
    SandboxEndedError,
    SandboxNotStartedError,
)
from isorun.sdk.images import AsyncImages, Images
from isorun.sdk.sandbox_async import AsyncProcess, AsyncPty, AsyncSandbox, AsyncWatch
from isorun.sdk.sandbox_sync import Process, Pty, Sandbox, Watch

__all__ = [
    "ApiError",
    "AsyncImages",
    "AsyncProcess",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncWatch",
    "AuthError",
    "CapacityError",
    "CommandFailed",
    "DaemonUnavailable",
    "ExecResult",
    "FileInfo",
    "Images",
    "NotFoundError",
    "Process",
    "ProcessInfo",
    "Pty",
    "PullProgress",
    "Sandbox",
    "SandboxClosedError",
    "SandboxEndedError",
    "SandboxNotStartedError",
    "Usage",
    "Watch",
]
