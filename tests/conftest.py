"""Shared fixtures: the real guest (kernel + initramfs from `make guest`) and VMs that
always get cleaned up."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from vmhelpers import assert_vm_gone, build_busybox_rootfs, qemu_pids_for, vm_spec

from isorun.vmm import MicroVM, artifacts, warm

CHECKOUT = Path(__file__).resolve().parents[1]


def _boot_this_checkouts_guest() -> None:
    """Boot the guest scripts/build-guest.sh built from this checkout, not the one any
    checkout on this machine built last ($cache/guest): set in os.environ so daemons and
    CLIs the tests start inherit it. An explicit ISORUN_KERNEL/ISORUN_INITRAMFS wins."""
    key = hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:16]
    own = artifacts.cache_root() / "guest" / "checkouts" / key
    for env, name in (("ISORUN_KERNEL", "vmlinux"), ("ISORUN_INITRAMFS", "initramfs.cpio")):
        if (own / name).is_symlink():
            # resolved now: the whole session boots one build, whatever is built meanwhile
            os.environ.setdefault(env, os.path.realpath(own / name))


_boot_this_checkouts_guest()

# Hypothesis' per-example deadline (200 ms) times the machine, not the code: an example
# slowed by a busy host would fail as DeadlineExceeded, or as "unreliable" when replayed.
settings.register_profile("isorun", deadline=None)
settings.load_profile("isorun")


@pytest.fixture(autouse=True)
def no_warm_failure_carries_over() -> Iterator[None]:
    """What one test's failed warm start taught this process (templates not retried for 10
    minutes) must not make a later test's warm starts boot cold."""
    warm.forget_failures()
    yield
    warm.forget_failures()


@pytest.fixture(scope="session", autouse=True)
def no_guest_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A test that leaks a VM under its tmp_path (a daemon's state directory) fails the run,
    and the VM is killed: left running it would slow every later test and CI step."""
    yield
    leaked = qemu_pids_for(tmp_path_factory.getbasetemp())
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"QEMU processes outlived the test session (killed now): {leaked}"


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
