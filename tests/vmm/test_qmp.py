"""The QMP monitor against a real QEMU (no guest needed: `-M none`)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from isorun.vmm import artifacts
from isorun.vmm.qmp import QMPMonitor


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[QMPMonitor]:
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        [
            artifacts.qemu_binary(),
            "-M",
            "none",
            "-nodefaults",
            "-nographic",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mon = QMPMonitor()
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.02)
        await mon.connect(sock)
        yield mon
    finally:
        await mon.close()
        qemu.kill()
        qemu.wait()


async def test_events_nobody_asked_for_are_not_kept(monitor: QMPMonitor) -> None:
    # Events a guest can cause (RTC_CHANGE, VSERPORT_CHANGE, ...) arrive for as long as
    # the VM lives; qemu.qmp's default listener would keep every one of them, unread.
    for _ in range(50):
        await monitor.execute("stop")
        await monitor.execute("cont")
    await asyncio.sleep(0.1)
    client = monitor._client
    kept = sum(len(listener.history) + listener._queue.qsize() for listener in client._listeners)
    assert kept == 0


async def test_shutdown_reason_is_still_seen(monitor: QMPMonitor) -> None:
    with contextlib.suppress(Exception):
        await monitor.execute("quit")
    for _ in range(100):
        if monitor.shutdown_reason is not None:
            break
        await asyncio.sleep(0.02)
    assert monitor.shutdown_reason == "host-qmp-quit"
