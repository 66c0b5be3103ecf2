"""Ends the state database refuses (another process holds its write lock, its disk is full)
are held, as a DELETE's is: the daemon still starts, a --kill-on-exit stop still kills every
VM, and what each VM used is kept (its run dir and cgroup, a small file in the state dir)
until the end is stored, by this daemon or the next."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from daemonhelpers import dead_vm_row, sandbox_row

from isorun.daemon import sandboxes
from isorun.daemon.config import DaemonConfig
from isorun.daemon.heldends import HELD_ENDS_DIR
from isorun.daemon.models import CreateSandbox
from isorun.daemon.sandboxes import SANDBOX_LABEL, SandboxManager
from isorun.daemon.store import LOCAL_TENANT, StateError, Store
from isorun.vmm import MicroVM, VMSpec, kill_orphan, remove_run_dir
from isorun.vmm.machine import VMUsage
from isorun.vmm.process import alive


@contextlib.contextmanager
def _locked(store: Store) -> Iterator[None]:
    """Another process (an operator's sqlite3 shell, a backup) holds the state database's
    write lock: every write of the daemon's is refused once its wait is over (50 ms here,
    not the daemon's 5 s)."""
    store.db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(str(store.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()
        store.db.execute("PRAGMA busy_timeout=5000")


def _config(tmp_path: Path, **kw: Any) -> DaemonConfig:
    return DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "img",
        default_memory_mib=256,
        warm_start=False,
        allow_raw_rootfs=True,
        **kw,
    )


def _held_file(cfg: DaemonConfig, sandbox_id: str) -> Path:
    return cfg.state_dir / HELD_ENDS_DIR / f"{sandbox_id}.json"


@pytest.mark.vm
async def test_a_start_on_a_locked_state_starts_and_keeps_what_the_vm_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A create cut short by a crash leaves its VM running; the next start must end it while
    # the state refuses writes. It did not start (the StateError escaped), and had removed
    # the VM's run dir and cgroup first: the start after recorded cpu 0 and memory 0.
    cfg = _config(tmp_path)
    store = Store(cfg.db_path)
    row = sandbox_row("sb-lockedstart0001", state="creating")
    store.insert_sandbox(row)
    vm = await MicroVM.boot(
        VMSpec(memory_mib=256, state_dir=cfg.state_dir, labels={SANDBOX_LABEL: row.id})
    )
    pid, run_dir = vm.pid, vm.run_dir
    # The start's sweep of empty VM cgroups, as though this VM's were over a minute old
    # (and kept from every other VM's on the host).
    sweep = sandboxes.cgroup.sweep_empty
    monkeypatch.setattr(
        sandboxes.cgroup, "sweep_empty", lambda: sweep(min_age_s=0, prefix=f"vm-{vm.id}")
    )
    try:
        await vm.detach()
        await asyncio.sleep(1.0)
        first = SandboxManager(cfg, store)
        with _locked(store):
            await first._readopt()
        assert first.row(LOCAL_TENANT, row.id).state == "ended"  # held, shown ended
        assert not alive(pid)
        assert run_dir.is_dir(), "the VM's run dir (and cgroup) went before its end was stored"
        # as on a disk too full for the held end's own file: the next start has the VM's
        # kept run dir and cgroup to measure it by
        _held_file(cfg, row.id).unlink()
        await SandboxManager(cfg, store)._readopt()
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        with contextlib.suppress(Exception):
            kill_orphan(run_dir)
            remove_run_dir(run_dir)
        store.close()
    assert got is not None and (got.state, got.end_reason) == ("ended", "error")
    assert record["cpu_ms"] > 100 and record["mem_peak_bytes"] > 10 << 20, record
    assert not run_dir.exists()


def test_a_start_on_a_locked_state_holds_a_lost_sandboxs_end(tmp_path: Path) -> None:
    # The same for a running sandbox whose VM died while no daemon ran.
    cfg = _config(tmp_path)
    store = Store(cfg.db_path)
    start = time.time() - 100
    row = dead_vm_row(cfg.vms_dir, "sb-deadlocked00001", "vmdeadlocked1", start, start + 30)
    run_dir = Path(row.run_dir or "")
    store.insert_sandbox(row)
    try:
        first = SandboxManager(cfg, store)
        with _locked(store):
            asyncio.run(first._readopt())
        shown = first.row(LOCAL_TENANT, row.id)
        assert (shown.state, shown.end_reason) == ("ended", "lost")
        assert run_dir.is_dir()
        assert store.get_sandbox(row.id).state == "running"  # type: ignore[union-attr]
        asyncio.run(SandboxManager(cfg, store)._readopt())  # the database takes it now
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        store.close()
    assert got is not None and (got.state, got.end_reason) == ("ended", "lost")
    assert record["uptime_ms"] == 30_000 and got.ended == pytest.approx(start + 30), record
    assert not run_dir.exists() and not _held_file(cfg, row.id).exists()


@pytest.mark.vm
async def test_an_end_held_for_a_locked_state_is_stored_by_the_next_daemon(
    tmp_path: Path, busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DELETE while the state is locked kills the VM, and its end is held in memory; the
    # daemon was stopped before the database took it (the operator's usual fix), and the
    # next one ended the sandbox 'lost' with cpu 0, memory 0, billed up to the restart.
    monkeypatch.setenv("ISORUN_STATE_DIR", str(tmp_path / "state"))  # its VMs' run dirs
    cfg = _config(tmp_path)
    store = Store(cfg.db_path)
    manager = SandboxManager(cfg, store)
    row = await manager.create(LOCAL_TENANT, CreateSandbox(image=f"rootfs:{busybox_rootfs}"))
    vm = manager.live[row.id].vm
    try:
        with _locked(store):
            with pytest.raises(StateError):
                await manager.kill(LOCAL_TENANT, row.id)
            held = manager.row(LOCAL_TENANT, row.id)
            usage = (held.cpu_ms, held.mem_peak_bytes, held.uptime_ms)
            await manager.stop()  # still locked: not stored
        assert store.get_sandbox(row.id).state == "running"  # type: ignore[union-attr]
        await asyncio.sleep(1.5)  # the daemon is down a while
        await SandboxManager(cfg, store)._readopt()
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
        console = store.console(row.id)
    finally:
        with contextlib.suppress(Exception):
            await vm.kill()
        store.close()
    assert got is not None and (got.end_reason, got.ended) == ("killed", held.ended)
    assert (record["cpu_ms"], record["mem_peak_bytes"], record["uptime_ms"]) == usage
    assert record["cpu_ms"] > 0 and console != ""
    assert not _held_file(cfg, row.id).exists()


class _FakeConn:
    def __init__(self) -> None:
        self._closed = asyncio.Event()
        self.failed = False

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        self._closed.set()


class _FakeAgent:
    def __init__(self) -> None:
        self.conn = _FakeConn()

    async def set_defaults(self, **kw: Any) -> None:
        pass


class _FakeConsole:
    def tail(self, n: int) -> str:
        return "console\n"


class _FakeVM:
    """Stands in for MicroVM.boot's VM: no QEMU (three sandboxes on a 2-core host)."""

    booted: ClassVar[list[_FakeVM]] = []

    def __init__(self, spec: VMSpec) -> None:
        self.id = f"vmfake{len(_FakeVM.booted):06d}"
        self.run_dir = Path(spec.state_dir or "/nonexistent") / "vms" / self.id
        self.pid = 999999
        self.agent = _FakeAgent()
        self.console = _FakeConsole()
        self.killed = False
        self._exited = asyncio.Event()
        _FakeVM.booted.append(self)

    @classmethod
    async def boot(cls, spec: VMSpec) -> _FakeVM:
        return cls(spec)

    async def kill(self) -> VMUsage:
        self.killed = True
        self._exited.set()
        await self.agent.conn.close()
        return VMUsage(cpu_ms=7, mem_peak_bytes=1 << 20, uptime_ms=1000)

    async def wait(self) -> str:
        await self._exited.wait()
        return "exited"

    async def detach(self) -> None:
        await self.agent.conn.close()


async def test_kill_on_exit_kills_every_vm_though_the_state_refuses_their_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first refused end raised out of stop(): the other VMs were neither killed nor
    # let go of, and ran on after the daemon had gone.
    monkeypatch.setattr(sandboxes.MicroVM, "boot", _FakeVM.boot)
    _FakeVM.booted.clear()
    cfg = _config(tmp_path, kill_on_exit=True, host_cpus=4, host_mem_mib=4096)
    rootfs = tmp_path / "root.ext4"
    rootfs.write_bytes(b"\0" * 1024)
    store = Store(cfg.db_path)
    manager = SandboxManager(cfg, store)
    try:
        ids = [
            (await manager.create(LOCAL_TENANT, CreateSandbox(image=f"rootfs:{rootfs}"))).id
            for _ in range(3)
        ]
        with _locked(store):
            await manager.stop()
        assert [vm.killed for vm in _FakeVM.booted] == [True, True, True]
        await SandboxManager(cfg, store)._readopt()  # their held ends, stored now
        ends = [store.get_sandbox(sid) for sid in ids]
    finally:
        store.close()
    assert [(r.state, r.end_reason) for r in ends if r is not None] == [
        ("ended", "daemon-stopped")
    ] * 3
