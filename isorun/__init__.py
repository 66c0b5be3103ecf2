"""isorun: hardware-isolated microVM sandboxes for AI agents."""

__version__ = "0.1.0"

from isorun.errors import IsorunError
from isorun.sdk import (
    ApiError,
    AsyncProcess,
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
    Sandbox,
    SandboxEndedError,
)

__all__ = [
    "ApiError", "AsyncProcess", "AsyncSandbox", "AuthError", "CapacityError", "CommandFailed",
    "DaemonUnavailable", "ExecResult", "FileInfo", "IsorunError", "NotFoundError", "Process",
    "ProcessInfo", "Sandbox", "SandboxEndedError", "__version__",
]
