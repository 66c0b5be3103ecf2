"""A file read whose bytes stop short never looks complete, and says why it stopped: the
sandbox died (its reason), the daemon went away (connection lost), or the guest failed."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from daemonhelpers import running_daemon
from vmhelpers import qemu_pids_for

from isorun import AsyncSandbox, DaemonUnavailable, Sandbox, SandboxEndedError
from isorun.sdk import _core
from isorun.sdk.errors import ApiError
from isorun.sdk.sandbox_sync import Files

pytestmark = pytest.mark.vm

BIG_MIB = 48


def test_a_sandbox_dying_mid_read_is_reported_as_its_end(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    with running_daemon(tmp_path / "d") as d:
        with Sandbox(f"rootfs:{busybox_rootfs}", api_url=f"unix:{d.sock}") as sb:
            sb.exec(f"dd if=/dev/zero of=/big bs=1M count={BIG_MIB} 2>/dev/null", check=True)
            got = 0
            with pytest.raises(SandboxEndedError, match="killed by signal 9") as err:
                for chunk in sb.files.read("/big", format="stream"):
                    if not got:
                        for pid in qemu_pids_for(d.state):
                            os.kill(pid, signal.SIGKILL)
                    got += len(chunk)
            assert 0 < got < BIG_MIB << 20, "a read cut short must not end like a whole one"
            assert "/big" in str(err.value) and "while /big was being read" in str(err.value)
        log = d.log()
        assert "GET files /big of sandbox" in log and "broken off" in log
        assert "Traceback" not in log


async def test_the_daemon_dying_mid_read_is_a_lost_connection(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    with running_daemon(tmp_path / "d") as d:
        sb = await AsyncSandbox.create(
            f"rootfs:{busybox_rootfs}", api_url=f"unix:{d.sock}", autostart=False
        )
        try:
            await sb.exec(f"dd if=/dev/zero of=/big bs=1M count={BIG_MIB} 2>/dev/null")
            got = 0
            with pytest.raises(DaemonUnavailable, match="was lost"):
                async for chunk in await sb.files.read("/big", format="stream"):
                    if not got:
                        d.stop(signal.SIGKILL)
                    got += len(chunk)
            assert 0 < got < BIG_MIB << 20
            d.start()
            # the sandbox ran on, and the read can be done again whole
            assert len(await sb.files.read("/big", format="bytes")) == BIG_MIB << 20
        finally:
            await sb.close()
            if d.proc is None:
                d.start()


def test_a_daemon_that_answers_after_a_cut_read_means_the_guest_failed() -> None:
    lost = DaemonUnavailable("lost")
    running = httpx.Response(200, json={"id": "sb-1", "state": "running"})
    err = _core.read_cut(lost, "/f", 10, running)
    assert isinstance(err, ApiError) and not isinstance(err, SandboxEndedError)
    assert (err.status, err.code) == (502, "read_failed")
    assert "reading /f broke off after 10 bytes" in str(err) and "retried" in str(err)
    assert _core.read_cut(lost, "/f", 10, None) is lost
    ended = httpx.Response(200, json={"id": "sb-1", "state": "ended", "end_reason": "oom"})
    assert "(oom)" in str(_core.read_cut(lost, "/f", None, ended))


def test_a_whole_file_read_keeps_the_clients_timeout(tmp_path: Path) -> None:
    # A daemon that takes the connection and never answers: read() gives up at the client's
    # timeout (a stream read is untimed on purpose; a whole-file read is not a stream).
    sock_path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(sock_path)
        srv.listen(4)
        http = _core.Client(
            sock_path,
            base_url="http://isorund",
            transport=httpx.HTTPTransport(uds=sock_path),
            timeout=httpx.Timeout(1.0),
        )
        sb = SimpleNamespace(
            id="sb-1", _http=http, _path=lambda tail="": f"/v1/sandboxes/sb-1/{tail}"
        )
        files = Files(sb)  # type: ignore[arg-type]
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="did not answer in time"):
            files.read("/f", format="bytes")
        assert time.monotonic() - t0 < 10
        http.close()
