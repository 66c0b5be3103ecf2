"""The SDK raises only IsorunErrors: a daemon that stops or dies under a client (upgrade,
crash) is DaemonUnavailable, also in the middle of a streamed exec, never a raw httpx error.
A daemon of its own, since this test kills it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from daemonhelpers import running_daemon

from isorun import AsyncSandbox, DaemonUnavailable, IsorunError, Sandbox

pytestmark = pytest.mark.vm


def test_daemon_gone_mid_stream_and_between_calls(tmp_path: Path, busybox_rootfs: Path) -> None:
    with running_daemon(tmp_path / "d") as d:
        api = f"unix:{d.sock}"
        sb = Sandbox(f"rootfs:{busybox_rootfs}", api_url=api, autostart=False)
        try:

            def kill_daemon(text: str) -> None:
                if "started" in text:
                    d.stop(signal.SIGKILL)

            with pytest.raises(DaemonUnavailable, match="lost") as cut:
                sb.exec("echo started; sleep 2; echo finished", on_stdout=kill_daemon)
            # It names the process, which runs on in the sandbox.
            proc_id = cut.value.__str__().split("Process ")[1].split()[0]
            with pytest.raises(DaemonUnavailable, match="no isorun daemon answers"):
                sb.exec("true")
            with pytest.raises(IsorunError):
                sb.files.read("/etc/passwd")
            d.start()
            r = sb.processes.connect(proc_id).wait()
            assert r.stdout == "started\nfinished\n" and r.exit_code == 0
        finally:
            sb.close()
            if d.proc is None:
                d.start()  # so that the fixture can clean up


async def test_async_daemon_gone(tmp_path: Path, busybox_rootfs: Path) -> None:
    with running_daemon(tmp_path / "d") as d:
        sb = await AsyncSandbox.create(
            f"rootfs:{busybox_rootfs}", api_url=f"unix:{d.sock}", autostart=False
        )
        try:
            d.stop(signal.SIGKILL)
            with pytest.raises(DaemonUnavailable, match="no isorun daemon answers"):
                await sb.exec("true")
            d.start()
            assert (await sb.exec("echo back")).stdout == "back\n"
        finally:
            await sb.close()
            if d.proc is None:
                d.start()
