"""The QMP monitor against a real QEMU (no guest needed: `-M none`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
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


async def test_a_qemu_flooding_shutdown_events_is_not_kept(tmp_path: Path) -> None:
    # QEMU may be the guest's by now: 400 SHUTDOWN events of 1 MiB each were all kept by
    # the listener (806 MB). The first of each event it needs is all that is taken.
    sock = tmp_path / "qmp.sock"

    async def fake_qemu(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        version = {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""}
        w.write(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode() + b"\n")
        request = json.loads(await r.read(4096))  # qmp_capabilities
        answer = {"return": {}, **({"id": request["id"]} if "id" in request else {})}
        w.write(json.dumps(answer).encode() + b"\n")
        pad = "x" * (1 << 20)
        for i in range(40):
            reason = "guest-shutdown" if i == 0 else f"fake-{i}"
            event = {"event": "SHUTDOWN", "data": {"reason": reason, "pad": pad}}
            w.write(json.dumps({**event, "timestamp": {"seconds": 0, "microseconds": 0}}).encode())
            w.write(b"\n")
            await w.drain()
        await asyncio.sleep(30)

    server = await asyncio.start_unix_server(fake_qemu, path=str(sock))
    mon = QMPMonitor()
    try:
        await mon.connect(sock)
        for _ in range(200):
            if mon.shutdown_reason is not None:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the rest of the flood arrives
        assert mon.shutdown_reason == "guest-shutdown"
        listeners = mon._client._listeners
        assert sum(len(listener.history) for listener in listeners) <= 1
    finally:
        await mon.close()
        server.close()
