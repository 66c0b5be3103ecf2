"""isorun: hardware-isolated microVM sandboxes for AI agents."""

__version__ = "0.1.0"

from isorun.errors import IsorunError
from isorun.sdk import (
    ApiError,
    AsyncProcess,
    AsyncPty,
    AsyncSandbox,
    AuthError,
    CapacityError,
    CommandFailed,
    DaemonUnavailable,
    ExecResult,
    FileInfo,
    NotFoundError,
    Process,
    ProcessInfo,
    Pty,
    Sandbox,
    SandboxEndedError,
)

__all__ = [
    "ApiError", "AsyncProcess", "AsyncPty", "AsyncSandbox", "AuthError", "CapacityError",
    "CommandFailed", "DaemonUnavailable", "ExecResult", "FileInfo", "IsorunError",
    "NotFoundError", "Process", "ProcessInfo", "Pty", "Sandbox", "SandboxEndedError",
    "__version__",
]
