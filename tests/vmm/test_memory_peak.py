"""A sandbox's memory peak is its VM's memory (guest RAM touched, QEMU's own), not the host
page cache its disk I/O brings in, and it survives the host process letting go of the VM."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from vmhelpers import vm_spec

from isorun.vmm import (
    MicroVM,
    kill_orphan,
    mempeak,
    qemu_cmd,
    remove_run_dir,
    running_pid,
    usage_of,
)
from isorun.vmm.rundir import last_written

pytestmark = pytest.mark.vm
MiB = 1 << 20
GUEST_MIB = 128


async def test_writing_more_than_its_memory_to_disk_is_not_counted_as_memory(
    busybox_rootfs: Path,
) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, memory_mib=GUEST_MIB, scratch_mib=1024))
    try:
        # memory the guest really holds: 48 MB in a tmpfs
        r = await vm.agent.exec("dd if=/dev/zero of=/dev/shm/held bs=1M count=48 2>&1")
        assert r.exit_code == 0, r.stdout
        # then 3x its memory through its disk: the host caches that file in its page cache
        # and charges it to QEMU's cgroup, which filled it to its limit (guest + 320 MiB)
        r = await vm.agent.exec("dd if=/dev/zero of=/big bs=1M count=384 2>&1 && sync && rm /big")
        assert r.exit_code == 0, r.stdout
    finally:
        usage = await vm.shutdown()
    assert usage.mem_peak_bytes >= 48 * MiB
    # all of its RAM at most, and QEMU's own (a translation cache of up to TCG_TB_MIB here)
    assert usage.mem_peak_bytes <= (GUEST_MIB + qemu_cmd.TCG_TB_MIB + 64) * MiB, usage


async def test_the_peak_of_a_vm_that_ended_while_nobody_watched_is_kept(
    busybox_rootfs: Path,
) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, memory_mib=GUEST_MIB))
    r = await vm.agent.exec("dd if=/dev/zero of=/dev/shm/held bs=1M count=48 2>&1; sleep 1.5")
    assert r.exit_code == 0, r.stdout
    await vm.agent.spawn("sleep 1; reboot -f")  # QEMU exits (-no-reboot)
    await vm.detach()  # as a daemon that stops, keeping its sandboxes
    deadline = time.monotonic() + 30
    while running_pid(vm.run_dir) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    try:
        assert running_pid(vm.run_dir) is None, "the guest did not reboot"
        # what the next daemon meters: QEMU and its memory are gone, their peak is not
        _, mem_peak = usage_of(vm.run_dir)
        assert mem_peak >= 48 * MiB
    finally:
        kill_orphan(vm.run_dir)
        remove_run_dir(vm.run_dir)


async def test_a_watched_vm_writes_its_run_dir_while_its_memory_holds_still(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM that dies while no daemon watches it is billed up to its run dir's last write;
    the peak of an idle one stopped growing seconds after its boot, and 40 s of it watched
    were billed 5.6 s. Now the peak is written again each HEARTBEAT_S however it goes."""
    monkeypatch.setattr(mempeak, "HEARTBEAT_S", 1.0)
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, memory_mib=GUEST_MIB))
    try:
        await asyncio.sleep(7)  # its peak settles (it grew last ~5 s after the boot)
        writes = set()
        for _ in range(6):
            writes.add((vm.run_dir / mempeak.FILE).stat().st_mtime)
            assert last_written(vm.run_dir) >= time.time() - 2.5
            await asyncio.sleep(1)
        assert len(writes) >= 4, writes
    finally:
        await vm.kill()
