"""A graceful stop (SIGTERM) that lands while the reaper is ending a sandbox lets that end
finish: it used to cancel the reaper between the VM's kill and the record of its end, so
the VM was gone, its row stayed 'running', and the next daemon called it lost, with no
console kept."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from isorun.daemon.config import DaemonConfig
from isorun.daemon.models import CreateSandbox
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store

pytestmark = pytest.mark.vm


async def test_a_stop_while_the_reaper_ends_a_sandbox_lets_the_end_be_stored(
    tmp_path: Path, busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_STATE_DIR", str(tmp_path / "state"))  # its VMs' run dirs
    cfg = DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        default_memory_mib=256,
        warm_start=False,
        allow_raw_rootfs=True,
        reaper_interval_s=0.05,
    )
    store = Store(cfg.db_path)
    manager = SandboxManager(cfg, store)
    await manager.start()
    row = await manager.create(LOCAL_TENANT, CreateSandbox(image=f"rootfs:{busybox_rootfs}"))
    live = manager.live[row.id]
    try:
        manager.set_timeout(LOCAL_TENANT, row.id, 1)
        while live.ending is None:  # the reaper has begun to end it: its VM is being killed
            await asyncio.sleep(0)
        await manager.stop()  # SIGTERM now; kill_on_exit is off, running VMs are kept
        stored = store.get_sandbox(row.id)
        assert stored is not None and (stored.state, stored.end_reason) == ("ended", "timeout")
        [record] = store.usage(LOCAL_TENANT, None, None)["records"]
        assert record["sandbox_id"] == row.id
        assert store.console(row.id) != ""  # why it died stays readable
        assert not live.vm.alive
    finally:
        with contextlib.suppress(Exception):
            await live.vm.kill()
        store.close()
