"""Daemon crash and restart: running VMs survive and are re-adopted; nothing leaks."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from daemonhelpers import Daemon, assert_no_leaks, ndjson
from vmhelpers import qemu_pids_for

pytestmark = pytest.mark.vm


def test_sigkill_mid_stream_then_restart_readopts(tmp_path: Path, busybox_rootfs: Path) -> None:
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
            ev = ndjson(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo kept > /tmp/state"}))
            assert ev[-1]["exit_code"] == 0
            bg = c.post(
                f"/v1/sandboxes/{sid}/exec",
                json={
                    "cmd": "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done",
                    "background": True,
                },
            ).json()["proc_id"]
            # An exec stream is open when the daemon is SIGKILLed.
            with c.stream(
                "POST", f"/v1/sandboxes/{sid}/exec", json={"cmd": "sleep 3; echo finished"}
            ) as r:
                fg = json.loads(next(r.iter_lines()))["proc_id"]
                d.stop(signal.SIGKILL)
        vm_pids = qemu_pids_for(d.state)
        assert vm_pids, "the VM must outlive the daemon"
        d.start()
        with d.client() as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "running"
            ev = ndjson(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /tmp/state"}))
            assert base64.b64decode(ev[1]["data"]) == b"kept\n"
            procs = {
                p["proc_id"]: p for p in c.get(f"/v1/sandboxes/{sid}/processes").json()["processes"]
            }
            assert procs[bg]["running"] is True
            # The command whose stream was cut finished; its output is in the ring.
            ev = ndjson(c.get(f"/v1/sandboxes/{sid}/processes/{fg}/stream"))
            assert ev[-1]["type"] == "exit" and ev[-1]["exit_code"] == 0
            assert b"finished" in b"".join(base64.b64decode(e["data"]) for e in ev if "data" in e)
            # A clean stop (SIGTERM) also keeps it running for the next daemon, and the
            # command an exec stream follows meanwhile with it (no CANCEL sent as it goes;
            # past uvicorn's 5 s grace for open requests).
            with c.stream(
                "POST",
                f"/v1/sandboxes/{sid}/exec",
                json={"cmd": "sleep 8; echo finished > /tmp/fg2; echo finished"},
            ) as r:
                lines = r.iter_lines()
                fg2 = json.loads(next(lines))["proc_id"]
                assert d.proc is not None
                d.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(httpx.HTTPError):
                    for _ in lines:  # until the stopping daemon lets go of the stream
                        pass
        d.stop(signal.SIGTERM)
        assert qemu_pids_for(d.state) == vm_pids
        d.start()
        with d.client() as c:
            assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
            ev = ndjson(c.get(f"/v1/sandboxes/{sid}/processes/{fg2}/stream", timeout=60))
            assert ev[-1]["type"] == "exit" and ev[-1]["exit_code"] == 0, ev[-1]
            usage = c.delete(f"/v1/sandboxes/{sid}").json()
            # Uptime spans both daemon restarts (measured from the VM's start).
            assert usage["uptime_ms"] > 3000 and usage["cpu_ms"] > 0
    finally:
        d.stop()
    assert_no_leaks(d)


def test_a_guest_that_powered_off_while_the_daemon_was_down_ends_as_poweroff(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # Without ACPI the guest's kernel halts and the daemon, watching its console, ends the
    # VM; with no daemon attached it only halts. The next daemon must see that at once,
    # not retry an agent that can never answer and then call the sandbox lost.
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
            r = c.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"cmd": "sleep 1; poweroff -f", "background": True},
            )
            assert r.status_code == 200, r.text
        d.stop()  # a clean stop keeps the sandbox's VM for the next daemon
        assert qemu_pids_for(d.state), "the VM must outlive the daemon"
        time.sleep(4)  # meanwhile it powers off
        started = time.monotonic()
        d.start()
        with d.client() as c:
            # a guest slow to halt on a busy host is adopted, then ends as it halts
            while (info := c.get(f"/v1/sandboxes/{sid}").json())["state"] != "ended":
                assert time.monotonic() - started < 15, info
                time.sleep(0.2)
            assert info["end_reason"] == "poweroff", info
            # its console was kept as it ended (what a daemon read of it: none read the halt)
            assert "isorun-agent: ready" in c.get(f"/v1/sandboxes/{sid}/logs").text
        assert time.monotonic() - started < 15  # not after the minute of retries
        assert not qemu_pids_for(d.state)
    finally:
        d.stop()
    assert_no_leaks(d)


def test_vm_killed_while_daemon_down_is_marked_lost(tmp_path: Path, busybox_rootfs: Path) -> None:
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post(
                "/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}", "sandbox_timeout": 2}
            ).json()["id"]
        d.stop(signal.SIGKILL)
        for pid in qemu_pids_for(d.state):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        deadline = time.monotonic() + 10
        while qemu_pids_for(d.state) and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon must come back to a VM that is really gone
        assert not qemu_pids_for(d.state), "QEMU outlived its SIGKILL"
        time.sleep(2.5)  # down past the sandbox's timeout
        d.start()
        with d.client() as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "ended" and info["end_reason"] == "lost"
            rec = {r["sandbox_id"]: r for r in c.get("/v1/usage").json()["records"]}[sid]
            # what its cgroup counted, and not billed past its own timeout for the downtime
            assert rec["cpu_ms"] > 0 and rec["mem_peak_bytes"] > 1 << 20, rec
            assert rec["uptime_ms"] <= 2000 + 500, rec
    finally:
        d.stop()
    assert_no_leaks(d)


def test_a_vm_lost_to_a_host_reboot_is_billed_up_to_the_boot_not_to_now(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # A sandbox started before the host last booted died by that boot (no VM outlives a
    # reboot); the next daemon billed it up to its own start: the host's downtime, and
    # here the whole time since this host booted. Its row is set to have started ten minutes
    # before this host's real boot time (/proc/stat btime), as after a reboot.
    btime = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
        d.stop(signal.SIGKILL)
        for pid in qemu_pids_for(d.state):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        with contextlib.closing(sqlite3.connect(str(d.state / "isorund.db"))) as db, db:
            db.execute(
                "UPDATE sandboxes SET created=?, started=?, expires=? WHERE id=?",
                (btime - 600, btime - 600, btime + 86400 * 30, sid),
            )
        d.start()
        with d.client() as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "ended" and info["end_reason"] == "lost", info
            rec = {r["sandbox_id"]: r for r in c.get("/v1/usage").json()["records"]}[sid]
            assert 600_000 <= rec["uptime_ms"] <= 601_000, rec
    finally:
        d.stop()
    assert_no_leaks(d)


def test_timeout_passed_while_daemon_down_is_not_billed_for_downtime(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post(
                "/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}", "sandbox_timeout": 2}
            ).json()["id"]
        d.stop(signal.SIGKILL)
        time.sleep(8)  # down well past the sandbox's timeout; its VM runs on meanwhile
        d.start()
        with d.client() as c:
            deadline = time.monotonic() + 15
            while (info := c.get(f"/v1/sandboxes/{sid}").json())["state"] != "ended":
                assert time.monotonic() < deadline, "the re-adopted sandbox was not reaped"
                time.sleep(0.2)
            assert info["end_reason"] == "timeout", info
            rec = {r["sandbox_id"]: r for r in c.get("/v1/usage").json()["records"]}[sid]
            # billed from its VM's start up to its expiry, as a lost VM is, not the downtime
            up_to_expiry = (info["expires_at"] - info["created_at"]) * 1000
            assert 2000 <= rec["uptime_ms"] <= up_to_expiry + 500, (rec, info)
            assert info["usage"]["uptime_ms"] == rec["uptime_ms"]
            assert rec["billed_seconds"] == -(-rec["uptime_ms"] // 1000)
    finally:
        d.stop()
    assert_no_leaks(d)


def _memory_cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") or controllers == "":
            d = Path("/sys/fs/cgroup") / ("memory" if controllers else "") / path.lstrip("/")
            if (d / "memory.limit_in_bytes").exists() or (d / "memory.max").exists():
                return d
    raise AssertionError(f"no memory cgroup for {pid}")


def test_vm_oom_killed_while_daemon_down_says_so(tmp_path: Path, busybox_rootfs: Path) -> None:
    # booted cold: a VM restored from a template has touched all of its RAM already
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256", ISORUN_WARM_START="0").start()
    try:
        with d.client() as c:
            sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
            # QEMU's host limit tightened to what it uses now + 32 MiB; two seconds after the
            # daemon is gone the guest fills RAM QEMU never touched, and QEMU crosses it
            mem = _memory_cgroup_of(min(qemu_pids_for(d.state)))
            v1 = (mem / "memory.limit_in_bytes").exists()
            used = int((mem / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
            limit_file = mem / ("memory.limit_in_bytes" if v1 else "memory.max")
            limit_file.write_text(str(used + (32 << 20)))
            limit = int(limit_file.read_text())  # as the kernel rounded it
            fill = "sleep 2; mkdir -p /m && mount -t tmpfs -o size=160m fill /m"
            fill += " && head -c 150000000 /dev/zero >/m/f"
            c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": fill, "background": True})
            d.stop(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while qemu_pids_for(d.state) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not qemu_pids_for(d.state), "QEMU was not OOM-killed"
        d.start()
        with d.client() as c:
            info = c.get(f"/v1/sandboxes/{sid}").json()
            assert info["state"] == "ended" and info["end_reason"] == "lost"
            oom = (
                f"out of memory: QEMU was killed at the VM's host memory limit of {limit >> 20} MiB"
            )
            assert f"{oom} for a 256 MiB guest" in info["error"]
    finally:
        d.stop()
    assert_no_leaks(d)


def test_open_stdin_survives_a_daemon_sigkill(tmp_path: Path, busybox_rootfs: Path) -> None:
    """Which processes have an open stdin is persisted; the pipe is reopened on demand."""
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256").start()
    try:
        with d.client() as c:
            sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
            base = f"/v1/sandboxes/{sid}/processes"
            r = c.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"cmd": "cat; echo eof", "background": True, "open_stdin": True},
            )
            cat = r.json()["proc_id"]
            closed = c.post(
                f"/v1/sandboxes/{sid}/exec",
                json={"cmd": "cat", "background": True, "open_stdin": True},
            ).json()["proc_id"]
            assert c.post(f"{base}/{closed}/stdin/close").status_code == 200
            # Written before the crash, so the old agent channel was open when it died.
            assert c.post(f"{base}/{cat}/stdin", content=b"before\n").status_code == 200
        d.stop(signal.SIGKILL)
        d.start()
        with d.client() as c:
            r = c.post(f"{base}/{cat}/stdin", content=b"after restart\n")
            assert r.status_code == 200, r.text
            assert c.post(f"{base}/{cat}/stdin/close").status_code == 200
            ev = ndjson(c.get(f"{base}/{cat}/stream", timeout=60))
            out = b"".join(base64.b64decode(e["data"]) for e in ev if e["type"] == "stdout")
            assert out == b"before\nafter restart\neof\n"
            assert ev[-1]["type"] == "exit" and ev[-1]["exit_code"] == 0
            # A stdin closed before the crash stays closed after it.
            r = c.post(f"{base}/{closed}/stdin", content=b"x")
            assert r.status_code == 409, r.text
            c.delete(f"/v1/sandboxes/{sid}")
    finally:
        d.stop()
    assert_no_leaks(d)


def test_a_running_vm_that_cannot_be_adopted_at_once_is_retried_not_killed(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # Another client holds QEMU's one QMP connection while the daemon restarts (an
    # operator's qmp-shell, a probe): the adoption fails for now. The VM runs on, so the
    # sandbox is retried (409 meanwhile), not killed and called lost.
    d = Daemon(tmp_path / "d", ISORUN_DEFAULT_MEMORY_MIB="256", ISORUN_WARM_START="0").start()
    try:
        with d.client() as c:
            sb = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()
            sid = sb["id"]
            ev = ndjson(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo kept > /tmp/k"}))
            assert ev[-1]["exit_code"] == 0
        run_dir = d.vm_dirs()[0]
        d.stop(signal.SIGKILL)
        with socket.socket(socket.AF_UNIX) as held:
            held.connect(str(run_dir / "qmp.sock"))
            assert b"QMP" in held.recv(200)
            d.start(timeout=60)
            with d.client() as c:
                r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
                assert r.status_code == 409 and "re-adopted" in r.text, r.text
                r = c.delete(f"/v1/sandboxes/{sid}")  # not 410 'already ended' for one that runs
                assert r.status_code == 409 and "re-adopted" in r.text, r.text
        deadline = time.monotonic() + 60
        with d.client() as c:
            while (
                r := c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /tmp/k"})
            ).status_code == 409:
                assert time.monotonic() < deadline, "never re-adopted"
                time.sleep(0.5)
            assert base64.b64decode(ndjson(r)[1]["data"]) == b"kept\n"
            assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
            assert c.delete(f"/v1/sandboxes/{sid}").status_code == 200
    finally:
        d.stop()
    assert_no_leaks(d)
