"""Shared fixtures: the real guest (kernel + initramfs from `make guest`) and VMs that
always get cleaned up."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from vmhelpers import assert_vm_gone, build_busybox_rootfs, vm_spec

from isorun.vmm import MicroVM, artifacts


@pytest.fixture(scope="session")
def guest_artifacts() -> tuple[Path, Path]:
    # Fails, never skips: CI must boot real guests (`make guest` builds them).
    return artifacts.kernel_path(), artifacts.initramfs_path()


@pytest.fixture(scope="session")
def busybox_rootfs(guest_artifacts: tuple[Path, Path]) -> Path:
    return build_busybox_rootfs()


@pytest_asyncio.fixture
async def vm(busybox_rootfs: Path) -> AsyncIterator[MicroVM]:
    machine = await MicroVM.boot(vm_spec(busybox_rootfs))
    try:
        yield machine
    finally:
        await machine.kill()
        assert_vm_gone(machine)
