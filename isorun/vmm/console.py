"""The guest's serial console: kept as a bounded tail in memory and a capped log file.

The guest is hostile and may print without end; neither the memory nor the file grows
past its cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_log = logging.getLogger(__name__)

TAIL_BYTES = 64 * 1024
FILE_CAP = 1024 * 1024
# A read smaller than this is followed by a short pause (see _pump).
SMALL_READ = 4096
FLOOD_PAUSE_S = 0.01


# Printed at KERN_EMERG, so visible under `quiet`. Without ACPI a microvm guest cannot
# power itself off: the kernel halts and QEMU would idle forever, so the host acts on it.
HALT_MARKERS = (b"reboot: System halted", b"reboot: Power down")
PANIC_MARKER = b"Kernel panic"


def read_tail(path: Path, max_bytes: int = TAIL_BYTES) -> str:
    """The last max_bytes of a console log file ("" if there is none): what a VM that ended
    while no ConsoleLog of this process read it printed."""
    return _last_bytes(path, max_bytes).decode("utf-8", "replace")


def _last_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - max_bytes))
            return f.read(max_bytes)
    except OSError:
        return b""


class ConsoleLog:
    def __init__(self, path: Path, on_halt: Callable[[], object] | None = None) -> None:
        self.path = path
        self.on_halt = on_halt
        self.halted = False
        self._tail = bytearray()
        self._written = 0
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    def start(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None = None
    ) -> None:
        # Keep the writer referenced: a collected StreamWriter closes the socket.
        self._writer = writer
        if not self._tail:
            # A VM adopted again (a daemon restart): its tail is what it printed before as
            # well, for its logs and the console kept at its end, not only what comes next.
            self._tail += _last_bytes(self.path, TAIL_BYTES)
        self._task = asyncio.create_task(self._pump(reader), name=f"console:{self.path}")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        # The log is a copy; reading is what matters (a halt is seen only here, and QEMU's
        # serial port blocks the guest when nobody reads): a log that cannot be written (the
        # state disk full) stops being written, the reading goes on.
        log = self._open_log()
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    return
                if not data:
                    return
                if len(data) < SMALL_READ:
                    # QEMU's serial port writes a few bytes at a time: a guest flooding its
                    # console woke this loop per write (80% of a host core, in no cgroup).
                    # Waiting a moment lets the bytes gather; the guest waits meanwhile.
                    await self._pause_reading(FLOOD_PAUSE_S)
                self._tail += data
                if not self.halted:
                    recent = bytes(self._tail[-(len(data) + 32) :])
                    if any(m in recent for m in HALT_MARKERS):
                        self.halted = True
                        if self.on_halt is not None:
                            self.on_halt()
                if len(self._tail) > TAIL_BYTES:
                    del self._tail[: len(self._tail) - TAIL_BYTES]
                if log is not None and not self._append(log, data):
                    _close_quietly(log)
                    log = None
        finally:
            if log is not None:
                _close_quietly(log)

    async def _pause_reading(self, seconds: float) -> None:
        """Sleep with the socket unread: a pause of this task alone left the transport
        reading each of QEMU's 2-3 byte writes into the reader's buffer (428,658 wakeups,
        5.1 s of the daemon's CPU for 10 s of a guest's `yes > /dev/console`; 0.7 s now)."""
        transport = self._writer.transport if self._writer is not None else None
        if not isinstance(transport, asyncio.ReadTransport) or not transport.is_reading():
            await asyncio.sleep(seconds)
            return
        transport.pause_reading()
        try:
            await asyncio.sleep(seconds)
        finally:
            if not transport.is_closing():
                transport.resume_reading()

    def _open_log(self) -> BinaryIO | None:
        try:
            # unbuffered: a write that fails fails there, with nothing left for close()
            log = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by _pump
        except OSError as exc:
            _log.warning("console log %s not kept: %s", self.path, exc)
            return None
        # a VM adopted again appends to its log: the cap is the file's, not this reader's
        self._written = log.tell()
        return log

    def _append(self, log: BinaryIO, data: bytes) -> bool:
        room = FILE_CAP - self._written
        if room <= 0:
            return True
        try:
            written = log.write(data[:room])
        except OSError as exc:
            _log.warning("console log %s stopped: %s", self.path, exc)
            return False
        self._written += written or 0
        return True

    @property
    def panicked(self) -> bool:
        """Whether the kernel's panic message is in the kept tail of the console."""
        return PANIC_MARKER in self._tail

    def tail(self, max_bytes: int = 4096) -> str:
        return bytes(self._tail[-max_bytes:]).decode("utf-8", "replace")

    async def drain(self, timeout: float = 1.0) -> None:
        """Wait (briefly) until QEMU's side closed and everything it printed was read."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _close_quietly(log: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        log.close()
