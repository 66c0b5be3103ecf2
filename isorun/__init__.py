"""isorun: hardware-isolated microVM sandboxes for AI agents."""

__version__ = "0.1.0"

from isorun.errors import IsorunError
from isorun.sdk import (
    ApiError,
    AsyncImages,
    AsyncProcess,
    AsyncPty,
    AsyncSandbox,
    AuthError,
    CapacityError,
    CommandFailed,
    DaemonUnavailable,
    ExecResult,
    FileInfo,
    Images,
    NotFoundError,
    Process,
    ProcessInfo,
    Pty,
    PullProgress,
    Sandbox,
    SandboxEndedError,
)

__all__ = [
    "ApiError",
    "AsyncImages",
    "AsyncProcess",
    "AsyncPty",
    "AsyncSandbox",
    "AuthError",
    "CapacityError",
    "CommandFailed",
    "DaemonUnavailable",
    "ExecResult",
    "FileInfo",
    "Images",
    "IsorunError",
    "NotFoundError",
    "Process",
    "ProcessInfo",
    "Pty",
    "PullProgress",
    "Sandbox",
    "SandboxEndedError",
    "__version__",
]
