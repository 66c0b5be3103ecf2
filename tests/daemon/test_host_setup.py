"""A host that cannot run VMs (no guest kernel built, no QEMU) is the operator's fault, not
the client's: a create says what to install or build, as a server error, and keeps the
failed sandbox on record as an error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from isorun.daemon.config import DaemonConfig
from isorun.daemon.errors import ApiError
from isorun.daemon.models import CreateSandbox
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.store import LOCAL_TENANT, Store
from isorun.errors import ConfigError


async def test_create_on_a_host_without_a_guest_kernel_is_a_server_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_KERNEL", str(tmp_path / "no-vmlinux"))
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    cfg = DaemonConfig(
        state_dir=tmp_path / "state",
        image_dir=tmp_path / "images",
        warm_start=False,
        allow_raw_rootfs=True,
        kill_on_exit=True,
    )
    store = Store(cfg.db_path)
    manager = SandboxManager(cfg, store)
    await manager.start()
    try:
        with pytest.raises(ApiError) as failed:
            await manager.create(LOCAL_TENANT, CreateSandbox(image=f"rootfs:{rootfs}"))
        assert failed.value.status == 500 and failed.value.code == "host_setup"
        assert "no-vmlinux" in str(failed.value) and "make guest" in str(failed.value)
        (row,) = store.list_sandboxes(LOCAL_TENANT)
        assert row.end_reason == "error" and "no-vmlinux" in (row.error or "")
    finally:
        await manager.stop()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ISORUN_CPU_OVERCOMMIT", "abc", "ISORUN_CPU_OVERCOMMIT='abc' is not a number"),
        ("ISORUN_DEFAULT_TIMEOUT", "5m", "ISORUN_DEFAULT_TIMEOUT='5m' is not a whole number"),
    ],
)
def test_a_setting_that_is_no_number_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    # isorund said only "could not convert string to float: 'abc'" (a traceback when run
    # as python -m isorun.daemon), naming no setting
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(says)):
        DaemonConfig()
