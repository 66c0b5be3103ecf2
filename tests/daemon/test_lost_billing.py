"""A sandbox whose VM did not outlive a host reboot is lost when the daemon starts again:
billed for the time it ran before the reboot, up to its own timeout, and ended then."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemonhelpers import dead_vm_row, sandbox_row

from isorun.daemon.config import DaemonConfig
from isorun.daemon.sandboxes import SandboxManager, _host_boot_time
from isorun.daemon.store import LOCAL_TENANT, Store


@pytest.mark.parametrize(
    ("ran_s", "timeout_s", "billed_s"),
    [
        (100, 300, 100),  # its timeout fell after the reboot: it was billed 0
        (400, 300, 300),  # its timeout came before the reboot: billed up to it
    ],
)
async def test_a_sandbox_lost_to_a_reboot_is_billed_until_the_reboot(
    tmp_path: Path, ran_s: int, timeout_s: int, billed_s: int
) -> None:
    booted = _host_boot_time()
    assert booted is not None
    cfg = DaemonConfig(state_dir=tmp_path / "state", image_dir=tmp_path / "img", warm_start=False)
    store = Store(cfg.db_path)
    started = booted - ran_s
    row = sandbox_row(
        "sb-reboot000000001",
        created=started,
        started=started,
        timeout_s=timeout_s,
        expires=started + timeout_s,
        run_dir=str(cfg.vms_dir / "vmgone"),  # the reboot took its VM and run dir
        vm_id="vmgone",
        pid=999999,
    )
    store.insert_sandbox(row)
    try:
        await SandboxManager(cfg, store)._readopt()
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        store.close()
    assert got is not None and got.end_reason == "lost"
    assert record["billed_seconds"] == billed_s, record
    assert got.uptime_ms == record["uptime_ms"] == billed_s * 1000
    # it ended by the reboot, not when a daemon got round to noticing
    assert got.ended == record["ended"] == booted


async def test_a_vm_that_died_while_the_daemon_was_down_is_billed_until_it_died(
    tmp_path: Path,
) -> None:
    # It ran 60 s and died 20 minutes before the daemon came back: it was billed 1201 s.
    # Its run dir says when it stopped: its console, its memory peak, last written then.
    cfg = DaemonConfig(state_dir=tmp_path / "state", image_dir=tmp_path / "img", warm_start=False)
    store = Store(cfg.db_path)
    start = time.time() - 1200
    row = dead_vm_row(cfg.vms_dir, "sb-dieddown0000001", "vmdieddown01", start, start + 60)
    store.insert_sandbox(row)
    try:
        await SandboxManager(cfg, store)._readopt()
        got = store.get_sandbox(row.id)
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
    finally:
        store.close()
    assert got is not None and got.end_reason == "lost"
    assert record["billed_seconds"] == 60, record
    assert got.ended == record["ended"] == pytest.approx(start + 60)
