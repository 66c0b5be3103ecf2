"""A sandbox whose agent connection fails while its VM runs on (a guest that broke the
protocol: the channel client closes the connection, tests/agent shows when) is ended and
billed, not left 'running' for its whole timeout with every request failing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isorun.daemon.config import DaemonConfig
from isorun.daemon.models import CreateSandbox
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store
from isorun.errors import ProtocolError

pytestmark = pytest.mark.vm


async def test_a_sandbox_whose_agent_connection_fails_is_ended_and_billed(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    cfg = DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        default_memory_mib=256,
        warm_start=False,
        allow_raw_rootfs=True,
        kill_on_exit=True,  # nothing left running whatever the outcome
    )
    store = Store(cfg.db_path)
    manager = SandboxManager(cfg, store)
    await manager.start()
    try:
        row = await manager.create(LOCAL_TENANT, CreateSandbox(image=f"rootfs:{busybox_rootfs}"))
        live = manager.live[row.id]
        # in the daemon's own state dir, where its sweep after a crash looks for orphans,
        # whatever $ISORUN_STATE_DIR says
        assert live.vm.run_dir.parent == cfg.vms_dir
        assert (await live.vm.agent.exec("true")).exit_code == 0
        # What the channel client does when the guest sends what the protocol forbids.
        live.vm.agent.conn.explain_close(ProtocolError("guest sent invalid JSON: test"))
        for _ in range(200):
            ended = store.get_sandbox(row.id)
            if ended is not None and ended.state != "running":
                break
            await asyncio.sleep(0.05)
        assert ended is not None and ended.state != "running"
        assert "agent-failed" in (ended.end_reason or "") and "invalid JSON" in ended.end_reason
        assert row.id not in manager.live and not live.vm.alive
        (record,) = store.usage(LOCAL_TENANT, None, None)["records"]
        assert record["sandbox_id"] == row.id and record["uptime_ms"] > 0
    finally:
        await manager.stop()
