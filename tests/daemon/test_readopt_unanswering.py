"""A restarted daemon re-adopts its running sandboxes before it serves: guests that never
answer (root replaced the agent) must not hold up its start, however many there are; they
are retried in the background meanwhile, their routes answering 409."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import sandbox_row

from isorun.daemon import sandboxes
from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import Conflict, Gone
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store

FAKE_QEMU = Path(__file__).with_name("fakeqemu.py")
GUESTS = 3
# Each VM is given sandboxes.READOPT_FIRST_S (2 s) for QMP and as long for its hello, all at
# once: one guest's worth whatever their number (it was 10 s each, one after another).
START_WITHIN_S = 6.0


@pytest.fixture
def fake_vms() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _running_sandbox(cfg: DaemonConfig, store: Store, procs: list[subprocess.Popen[bytes]]) -> str:
    """A sandbox recorded running, whose VM (a fakeqemu) runs and whose agent is silent."""
    vm_id = "vm" + uuid.uuid4().hex[:10]
    sid = "sb-" + uuid.uuid4().hex[:16]
    run = cfg.vms_dir / vm_id
    run.mkdir(parents=True)
    labels = {sandboxes.SANDBOX_LABEL: sid}
    proc = subprocess.Popen([sys.executable, str(FAKE_QEMU), str(run)], stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    vm = {"id": vm_id, "pid": proc.pid, "accel": "tcg", "channel": "serial", "vcpus": 1}
    (run / "vm.json").write_text(json.dumps({**vm, "memory_mib": 256, "labels": labels}))
    (run / "labels.json").write_text(json.dumps(labels))
    now = time.time()
    store.insert_sandbox(
        sandbox_row(
            sid,
            image="x",
            disk_mib=512,
            created=now,
            timeout_s=3600,
            expires=now + 3600,
            started=now,
            run_dir=str(run),
            pid=proc.pid,
            vm_id=vm_id,
        )
    )
    return sid


async def test_guests_that_never_answer_do_not_hold_up_the_daemons_start(
    tmp_path: Path, fake_vms: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandboxes.cgroup, "sweep_empty", lambda: 0)  # not the host's cgroups
    cfg = DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        warm_start=False,
        kill_on_exit=False,  # the fakes are killed by the fixture
    )
    store = Store(cfg.db_path)
    ids = [_running_sandbox(cfg, store, fake_vms) for _ in range(GUESTS)]
    manager = SandboxManager(cfg, store)
    started = time.monotonic()
    await manager.start()
    took = time.monotonic() - started
    try:
        assert took < START_WITHIN_S, f"{GUESTS} silent guests held up the start {took:.1f} s"
        for sid in ids:
            with pytest.raises(Conflict, match="being re-adopted"):
                manager.get_live(LOCAL_TENANT, sid)
            assert store.get_sandbox(sid).state == "running"  # type: ignore[union-attr]
    finally:
        await manager.stop()


async def test_a_sandbox_given_up_while_the_state_is_locked_shows_ended(
    tmp_path: Path, fake_vms: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its VM died while it was retried, and the state refused the end: it was only logged,
    # the VM's run dir gone, and for the rest of the daemon's life the sandbox showed
    # running while every request on it was 410 and a DELETE said "already ended (None)".
    monkeypatch.setattr(sandboxes.cgroup, "sweep_empty", lambda: 0)
    monkeypatch.setattr(sandboxes, "READOPT_FIRST_S", 0.5)
    monkeypatch.setattr(sandboxes, "READOPT_PAUSE_S", 0.1)
    cfg = DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        warm_start=False,
        kill_on_exit=False,
    )
    store = Store(cfg.db_path)
    sid = _running_sandbox(cfg, store, fake_vms)
    manager = SandboxManager(cfg, store)
    await manager._readopt()
    assert sid in manager._readopting
    store.db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(str(cfg.db_path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the state's write lock
    try:
        fake_vms[0].kill()  # its VM dies while it is retried
        fake_vms[0].wait()
        deadline = time.monotonic() + 10
        while sid in manager._readopting:
            assert time.monotonic() < deadline, "never given up"
            await asyncio.sleep(0.05)
        shown = manager.row(LOCAL_TENANT, sid)
        assert (shown.state, shown.end_reason) == ("ended", "lost")
        assert manager.list(LOCAL_TENANT, {}, include_ended=False) == []
        with pytest.raises(Gone, match=r"ended \(lost\)"):
            manager.get_live(LOCAL_TENANT, sid)
        with pytest.raises(Gone, match=r"already ended \(lost\)"):
            await manager.kill(LOCAL_TENANT, sid)
    finally:
        other.execute("ROLLBACK")
        other.close()
    try:
        await manager._record_pending_ends()  # as the reaper does, once the lock is let go
        got = store.get_sandbox(sid)
        assert got is not None and (got.state, got.end_reason) == ("ended", "lost")
    finally:
        await manager.stop()
        store.close()
