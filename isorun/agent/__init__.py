"""Host side of the guest agent protocol (docs/protocol.md)."""

from isorun.agent.client import AgentClient, Attachment, ExecResult, Watch
from isorun.agent.mux import AgentConnection
from isorun.agent.validate import FileEntry, ProcInfo

__all__ = [
    "AgentClient",
    "AgentConnection",
    "Attachment",
    "ExecResult",
    "FileEntry",
    "ProcInfo",
    "Watch",
]
