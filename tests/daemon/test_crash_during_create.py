"""A sandbox whose create the daemon did not finish (it crashed or was killed after the VM
booted, before the row said running) is ended when the daemon starts again, its VM killed
and billed for what it used, not recorded as having used nothing."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from daemonhelpers import sandbox_row

from isorun.daemon.config import DaemonConfig
from isorun.daemon.sandboxes import SANDBOX_LABEL, SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store
from isorun.vmm import MicroVM, VMSpec
from isorun.vmm.process import alive
from isorun.vmm.rundir import LABELS_FILE

pytestmark = pytest.mark.vm


async def test_a_vm_booted_for_a_create_cut_short_is_killed_and_billed(tmp_path: Path) -> None:
    cfg = DaemonConfig(state_dir=tmp_path / "state", image_dir=tmp_path / "img", warm_start=False)
    store = Store(cfg.db_path)
    row = sandbox_row("sb-cutshort0000001", state="creating")
    store.insert_sandbox(row)
    # what the crashed daemon left: the VM it booted for the sandbox, running on
    vm = await MicroVM.boot(
        VMSpec(memory_mib=256, state_dir=cfg.state_dir, labels={SANDBOX_LABEL: row.id})
    )
    pid, run_dir = vm.pid, vm.run_dir
    try:
        await vm.detach()
        await asyncio.sleep(1.0)
        await SandboxManager(cfg, store)._readopt()
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        if alive(pid):
            await vm.kill()
        store.close()
    assert got is not None and (got.state, got.end_reason) == ("ended", "error")
    assert "stopped while this sandbox was starting" in (got.error or "")
    assert not alive(pid) and not run_dir.exists()
    # it booted a kernel and ran for a second at least: that is what it is billed for
    assert record["cpu_ms"] > 100 and record["mem_peak_bytes"] > 10 << 20, record
    assert record["uptime_ms"] >= 1000, record


def _dead_vm_dir(vms: Path, name: str, sandbox_id: str, started: float, last: float) -> Path:
    """A run dir as a VM that died while no daemon watched leaves it: its labels, vm.json
    naming a pid long gone, and its console last written when it died."""
    d = vms / name
    d.mkdir(parents=True)
    (d / LABELS_FILE).write_text(json.dumps({SANDBOX_LABEL: sandbox_id}))
    (d / "vm.json").write_text(json.dumps({"id": name, "pid": 999999, "started_unix": started}))
    (d / "console.log").write_text("booted\n")
    for f in d.iterdir():
        os.utime(f, (last, last))
    return d


@pytest.mark.parametrize(
    ("timeout_s", "billed_s"),
    [
        (600, 50),  # a retried boot: two VMs, 40 s each, 10 s apart: 50 s of wall time
        (30, 30),  # never past its own timeout
    ],
)
def test_vms_of_a_create_cut_short_that_died_meanwhile_bill_the_time_they_ran(
    tmp_path: Path, timeout_s: int, billed_s: int
) -> None:
    cfg = DaemonConfig(state_dir=tmp_path / "state", image_dir=tmp_path / "img", warm_start=False)
    store = Store(cfg.db_path)
    row = sandbox_row("sb-cutshort0000002", state="creating", timeout_s=timeout_s)
    store.insert_sandbox(row)
    start = time.time() - 1200  # the daemon has been down for 20 minutes since
    dirs = [
        _dead_vm_dir(cfg.vms_dir, "vmfirst00001", row.id, start, start + 40),
        _dead_vm_dir(cfg.vms_dir, "vmretry00001", row.id, start + 10, start + 50),
    ]
    try:
        asyncio.run(SandboxManager(cfg, store)._readopt())
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        store.close()
    assert got is not None and (got.state, got.end_reason) == ("ended", "error")
    assert record["billed_seconds"] == billed_s, record
    assert got.ended == pytest.approx(start + 50)  # when the last of them stopped
    assert not any(d.exists() for d in dirs)


def test_run_dirs_no_sandbox_keeps_are_removed_and_others_left(tmp_path: Path) -> None:
    """The sweep at start: a run dir labelled for a sandbox no row runs (ended, or never
    recorded) goes; one with no sandbox label is another VMM user's and stays."""
    cfg = DaemonConfig(state_dir=tmp_path / "state", image_dir=tmp_path / "img", warm_start=False)
    store = Store(cfg.db_path)
    ended = sandbox_row("sb-endedalready001", state="ended")
    store.insert_sandbox(ended)
    now = time.time()
    gone = [
        _dead_vm_dir(cfg.vms_dir, "vmofended001", ended.id, now - 60, now - 30),
        _dead_vm_dir(cfg.vms_dir, "vmnorow00001", "sb-neverrecorded01", now - 60, now - 30),
    ]
    foreign = cfg.vms_dir / "someoneelses"
    foreign.mkdir()
    try:
        asyncio.run(SandboxManager(cfg, store)._readopt())
    finally:
        store.close()
    assert not any(d.exists() for d in gone)
    assert foreign.is_dir()
