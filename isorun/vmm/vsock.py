"""The agent channel over virtio-vsock, where the host has `/dev/vhost-vsock`.

virtio-serial works everywhere (it is all these TCG hosts have); vsock skips QEMU's
chardev layer: the host kernel moves the bytes. The host reserves a guest CID itself, on
its own open `/dev/vhost-vsock` (the ioctl QEMU would otherwise make), and hands QEMU
that fd: two VMs can never race for one CID, and the CID is free again when QEMU exits.
The agent listens on AGENT_PORT and serves only CID 2 (the host), never a process inside
the guest. Every VM keeps its virtio-serial port too, so `ISORUN_CHANNEL=serial` always
works.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from isorun.errors import ConfigError
from isorun.vmm.devnode import open_error

VHOST_VSOCK = Path("/dev/vhost-vsock")
AGENT_PORT = 1024
CHANNELS = ("auto", "serial", "vsock")
# _IOW(VHOST_VIRTIO=0xAF, 0x60, __u64) from <linux/vhost.h>.
_VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
# CIDs 0-2 are the hypervisor, loopback and host; 0xFFFFFFFF is VMADDR_CID_ANY.
FIRST_GUEST_CID = 3
LAST_GUEST_CID = 0xFFFFFFFE
_RESERVE_TRIES = 32
# While the guest boots, connecting is refused or reset until the agent listens.
_NOT_LISTENING = (errno.ECONNRESET, errno.ECONNREFUSED, errno.ENODEV, errno.ETIMEDOUT)


@dataclass(frozen=True, slots=True)
class ChannelChoice:
    name: str  # "serial" or "vsock"
    reason: str


# Why auto is serial: the host's side of vsock has no access control (any local user's
# socket(AF_VSOCK) reaches CID 2's peers, and a VM's CID is in its world-readable argv), and
# the agent does not authenticate a peer yet: over vsock any local user could drive a
# sandbox's agent. virtio-serial's socket is in the VM's 0700 run dir.
_AUTO_IS_SERIAL = (
    "auto: vsock only when asked (ISORUN_CHANNEL=vsock, on a host whose local users are all "
    "trusted): every local user can reach a guest's vsock and the agent does not "
    "authenticate a peer"
)


def choose(requested: str | None = None, device: Path = VHOST_VSOCK) -> ChannelChoice:
    """virtio-serial unless vsock is asked for (and then only if the host can give a guest
    one): see _AUTO_IS_SERIAL."""
    want = (requested or os.environ.get("ISORUN_CHANNEL") or "auto").lower()
    if want not in CHANNELS:
        raise ConfigError(
            f"agent channel '{want}' is not one of {', '.join(CHANNELS)} (ISORUN_CHANNEL)"
        )
    if want == "serial":
        return ChannelChoice("serial", "requested")
    if want == "auto":
        return ChannelChoice("serial", _AUTO_IS_SERIAL)
    unusable = open_error(device) if hasattr(socket, "AF_VSOCK") else "no AF_VSOCK in Python"
    if unusable:
        raise ConfigError(f"agent channel vsock requested but {unusable} (modprobe vhost_vsock)")
    return ChannelChoice("vsock", f"requested; {device} usable")


class CidLease:
    """An open vhost-vsock device with a guest CID set on it. Pass `fd` to QEMU
    (`vhostfd=`), then `close()` the host's copy: the CID lives as long as QEMU."""

    def __init__(self, fd: int, cid: int) -> None:
        self.fd = fd
        self.cid = cid

    @classmethod
    def reserve(cls, device: Path = VHOST_VSOCK) -> CidLease:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open {device} for a guest vsock: {exc}") from exc
        try:
            for _ in range(_RESERVE_TRIES):
                cid = FIRST_GUEST_CID + secrets.randbelow(LAST_GUEST_CID - FIRST_GUEST_CID + 1)
                try:
                    fcntl.ioctl(fd, _VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
                    return cls(fd, cid)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise ConfigError(
                            f"{device} refused guest CID {cid}: {exc} (is it a vhost-vsock device?)"
                        ) from exc
            raise ConfigError(f"{device}: no free guest CID in {_RESERVE_TRIES} random tries")
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def open_stream(
    cid: int, port: int, limit: int, retry_for: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a guest's vsock port, retrying for `retry_for` seconds while nothing
    listens there yet (the guest is still booting)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + retry_for
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (cid, port))
            return await asyncio.open_connection(sock=sock, limit=limit)
        except OSError as exc:
            sock.close()
            if exc.errno not in _NOT_LISTENING or time.monotonic() >= deadline:
                raise
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(0.01)
