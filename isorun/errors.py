"""One rooted exception hierarchy. Messages say what to change, not only what broke."""

from __future__ import annotations


class IsorunError(Exception):
    """Base of every error isorun raises on purpose."""


class ConfigError(IsorunError):
    """A missing dependency, artifact or setting; the message names what to install or set."""


class ProtocolError(IsorunError):
    """The guest sent something that breaks the agent protocol; its channel is closed."""


class ChannelClosedError(IsorunError):
    """The agent channel is gone (guest died, shut down or was cut off for misbehaving)."""


class ConsumerTooSlowError(IsorunError):
    """One request's events from the guest were not taken in time: that request was
    cancelled (agent/mux.py); the sandbox and its other requests go on."""


class RequestTooLargeError(IsorunError):
    """A request does not fit in the one frame the guest agent reads it from; nothing
    was sent. Big inputs go as stdin or a file, not in the command, argv or env."""


class GuestError(IsorunError):
    """The guest agent refused or failed a request; `code` is the agent's error code."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class FileNotFoundInGuest(GuestError):
    """A path inside the sandbox does not exist."""


class VMError(IsorunError):
    """The virtual machine failed to start or died; `reason` says how."""

    def __init__(self, message: str, reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class BootTimeout(VMError):
    """The guest did not become ready before its deadline."""
