"""The agent channel over virtio-vsock, where the host has `/dev/vhost-vsock`.

virtio-serial works everywhere (it is all these TCG hosts have); vsock skips QEMU's
chardev layer: the host kernel moves the bytes. The host reserves a guest CID itself, on
its own open `/dev/vhost-vsock` (the ioctl QEMU would otherwise make), and hands QEMU
that fd: two VMs can never race for one CID, and the CID is free again when QEMU exits.
The agent listens on AGENT_PORT and serves only CID 2 (the host), never a process inside
the guest. Every VM keeps its virtio-serial port too, so `ISORUN_CHANNEL=serial` always
works.

The host's side of vsock has no access control: any local user's socket(AF_VSOCK) reaches
a guest, and a VM's CID is in its world-readable argv. So the host first says hello on the
serial port (a socket in the VM's 0700 run dir) with a fresh per-VM key, and the agent
serves a vsock peer only once its first hello carries that key (open_keyed).
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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from isorun.agent.client import AgentClient
from isorun.agent.mux import AgentConnection
from isorun.errors import ChannelClosedError, ConfigError, IsorunError
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
    # asked for by name: a vsock that fails is an error, not a fall back to serial
    required: bool = False


def choose(
    requested: str | None = None, device: Path = VHOST_VSOCK, warm_start: bool = False
) -> ChannelChoice:
    """vsock where the host can give a guest one, else virtio-serial. `auto` picks serial
    for a boot that may restore a warm template: a template restores over serial only (a
    vsock device carries its CID in the saved state)."""
    want = (requested or os.environ.get("ISORUN_CHANNEL") or "auto").lower()
    if want not in CHANNELS:
        raise ConfigError(
            f"agent channel '{want}' is not one of {', '.join(CHANNELS)} (ISORUN_CHANNEL)"
        )
    if want == "serial":
        return ChannelChoice("serial", "requested", required=True)
    unusable = open_error(device) if hasattr(socket, "AF_VSOCK") else "no AF_VSOCK in Python"
    if want == "auto":
        if warm_start:
            return ChannelChoice("serial", "auto: a warm start restores over virtio-serial only")
        if unusable:
            return ChannelChoice("serial", f"auto: {unusable}")
        return ChannelChoice("vsock", f"auto: {device} usable")
    if unusable:
        raise ConfigError(f"agent channel vsock requested but {unusable} (modprobe vhost_vsock)")
    return ChannelChoice("vsock", f"requested; {device} usable", required=True)


def new_key() -> str:
    """A VM's vsock key: what a vsock peer must show the agent (32 random bytes, hex)."""
    return secrets.token_hex(32)


# A vsock that does not serve once the serial hello was answered (the agent is up by then)
# is given up on this soon when serial may serve instead; never sooner than the least.
FALL_BACK_AFTER_S = 2.0
LEAST_VSOCK_WINDOW_S = 0.5
# Between tries of a vsock connection the agent closed unanswered (see _over_vsock).
_RETRY_VSOCK_S = 0.01

OpenSerial = Callable[[float], Awaitable[AgentConnection]]
OpenVsock = Callable[[Mapping[str, str], float], Awaitable[AgentConnection]]


async def open_keyed(
    open_serial: OpenSerial, open_vsock: OpenVsock, key: str, timeout: float, fall_back: bool
) -> tuple[AgentConnection, str | None]:
    """Say hello on the serial port and give the agent `key` there, then connect over vsock
    showing it: that connection, and None. When vsock does not serve (an agent without
    vsock keys; vsock refused, silent, reset) and with `fall_back`: the serial connection,
    and why. `open_serial` takes a timeout, `open_vsock` the hello's extra fields and a
    timeout; everything within `timeout` (the vsock step at least LEAST_VSOCK_WINDOW_S)."""
    deadline = time.monotonic() + timeout
    serial = await open_serial(timeout)
    left = max(LEAST_VSOCK_WINDOW_S, deadline - time.monotonic())
    within = min(left, FALL_BACK_AFTER_S) if fall_back else left
    try:
        async with asyncio.timeout(within):
            conn = await _over_vsock(serial, open_vsock, key, time.monotonic() + within)
    except BaseException as exc:
        usable = isinstance(exc, OSError | TimeoutError | IsorunError) and not serial.is_closed
        if fall_back and usable:
            return serial, f"vsock did not serve: {str(exc) or type(exc).__name__}"
        await serial.close()
        raise
    try:
        await serial.close()
    except BaseException:
        await conn.close()  # cancelled meanwhile: no caller would ever see it
        raise
    return conn, None


async def _over_vsock(
    serial: AgentConnection, open_vsock: OpenVsock, key: str, deadline: float
) -> AgentConnection:
    if "vsock_key" not in serial.features:
        raise ConfigError(
            "the guest's agent takes no vsock key (it predates them: rebuild the guest "
            "with `make guest`, or use ISORUN_CHANNEL=serial)"
        )
    await AgentClient(serial).call("set_vsock_key", key=key)
    while True:
        try:
            return await open_vsock({"key": key}, max(0.1, deadline - time.monotonic()))
        except ChannelClosedError:
            # Closed before our hello was read: other local users' connects can push ours
            # out of the agent's few places for connections that have not shown the key.
            if time.monotonic() + _RETRY_VSOCK_S >= deadline:
                raise
            await asyncio.sleep(_RETRY_VSOCK_S)


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
