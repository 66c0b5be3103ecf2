"""A sandbox whose create the daemon did not finish (it crashed or was killed after the VM
booted, before the row said running) is ended when the daemon starts again, its VM killed
and billed for what it used, not recorded as having used nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from daemonhelpers import sandbox_row

from isorun.daemon.config import DaemonConfig
from isorun.daemon.sandboxes import SANDBOX_LABEL, SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store
from isorun.vmm import MicroVM, VMSpec
from isorun.vmm.process import alive

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
