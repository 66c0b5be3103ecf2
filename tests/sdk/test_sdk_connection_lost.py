"""The SDK raises only IsorunErrors: a daemon that stops or dies under a client (upgrade,
crash) is DaemonUnavailable, also in the middle of a streamed exec, never a raw httpx error.
A daemon of its own, since this test kills it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from daemonhelpers import running_daemon

from isorun import AsyncSandbox, DaemonUnavailable, IsorunError, Sandbox
from isorun.sdk import _core

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


def test_daemon_gone_while_iterating_a_process_says_how_to_follow_it_again(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    with running_daemon(tmp_path / "d") as d:
        sb = Sandbox(f"rootfs:{busybox_rootfs}", api_url=f"unix:{d.sock}", autostart=False)
        try:
            proc = sb.exec("echo started; sleep 2; echo finished", background=True)
            seen: list[str] = []
            with pytest.raises(DaemonUnavailable, match="lost") as cut:
                for _, text in proc:
                    seen.append(text)
                    d.stop(signal.SIGKILL)
            assert seen == ["started\n"]
            assert f"sandbox.processes.connect({proc.id!r})" in str(cut.value)
            d.start()
            again = [text for _, text in sb.processes.connect(proc.id)]
            assert "".join(again) == "started\nfinished\n"
        finally:
            sb.close()
            if d.proc is None:
                d.start()


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


def test_a_silent_command_keeps_its_stream_and_a_frozen_daemon_is_noticed(
    tmp_path: Path, busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that prints nothing for longer than the SDK's stream idle limit still
    ends normally (the daemon's keepalives fill the silence); a daemon that stops sending
    anything (frozen here, as a dead host or network looks) is DaemonUnavailable within
    that limit instead of a wait for ever."""
    with running_daemon(tmp_path / "d", ISORUN_STREAM_KEEPALIVE_S="0.3") as d:
        sb = Sandbox(f"rootfs:{busybox_rootfs}", api_url=f"unix:{d.sock}", autostart=False)
        try:
            # the daemon's health says it keeps streams alive: the SDK limits their reads
            monkeypatch.delenv("ISORUN_STREAM_IDLE_TIMEOUT_S", raising=False)
            assert sb._http.ndjson_timeout().read == 90.0
            monkeypatch.setenv("ISORUN_STREAM_IDLE_TIMEOUT_S", "2")
            sb._http._stream_idle = _core.stream_idle_limit(None)  # read once per client
            r = sb.exec("sleep 4; echo done")
            assert r.stdout == "done\n" and r.exit_code == 0
            exec_url = f"/v1/sandboxes/{sb.id}/exec"
            with d.client() as c, c.stream("POST", exec_url, json={"cmd": "sleep 1"}) as s:
                kinds = [json.loads(line)["type"] for line in s.iter_lines()]
            assert kinds[0] == "start" and kinds[-1] == "exit" and "keepalive" in kinds[1:-1]

            def freeze_daemon(text: str) -> None:
                if "started" in text:
                    assert d.proc is not None
                    d.proc.send_signal(signal.SIGSTOP)

            t0 = time.monotonic()
            try:
                with pytest.raises(DaemonUnavailable, match="did not answer in time") as cut:
                    sb.exec("echo started; sleep 30", on_stdout=freeze_daemon)
            finally:
                assert d.proc is not None
                d.proc.send_signal(signal.SIGCONT)
            assert time.monotonic() - t0 < 15
            assert "runs on in the sandbox" in str(cut.value)
        finally:
            sb.close()
