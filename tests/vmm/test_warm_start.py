"""Warm start (VMSpec.warm_start): a VM restored from a booted template is a VM of its own,
with the user's image, its own randomness and the host's clock; a template that will not
restore is replaced, never trusted."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from vmhelpers import assert_vm_gone, qemu_pids_for, vm_spec

from isorun.agent import AgentClient
from isorun.errors import VMError
from isorun.vmm import MicroVM, VMSpec, artifacts, warm

pytestmark = pytest.mark.vm


def _template(memory_mib: int = 256) -> Path:
    key = warm.template_key(
        artifacts.qemu_binary(),
        artifacts.kernel_path(),
        artifacts.initramfs_path(),
        MicroVM.accel_for(VMSpec()).name,
        1,
        memory_mib,
    )
    return warm.template_dir() / f"{key}.vmstate"


@pytest_asyncio.fixture
async def warm_vms(busybox_rootfs: Path) -> AsyncIterator[list[MicroVM]]:
    vms: list[MicroVM] = []
    try:
        yield vms
    finally:
        for vm in vms:
            await vm.kill()
            assert_vm_gone(vm)


async def _warm(rootfs: Path, vms: list[MicroVM]) -> MicroVM:
    vm = await MicroVM.boot(vm_spec(rootfs, warm_start=True))
    vms.append(vm)
    return vm


async def _restored(vm: MicroVM) -> bool:
    """A restored guest runs with the template's kernel command line, which names no root
    disk (the agent mounts it on request); a cold-booted one names it."""
    return "isorun.root=" not in await _out(vm, "cat /proc/cmdline")


async def _out(vm: MicroVM, cmd: str) -> str:
    r = await vm.agent.exec(cmd)
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode().strip()


async def test_warm_started_vms_each_have_the_image_their_own_randomness_and_the_clock(
    busybox_rootfs: Path, warm_vms: list[MicroVM]
) -> None:
    a = await _warm(busybox_rootfs, warm_vms)
    made = _template().stat().st_ino  # a new template is a new file (os.replace)
    b = await _warm(busybox_rootfs, warm_vms)
    assert _template().stat().st_ino == made, "the second warm start made a new template"
    random = []
    for vm in (a, b):
        assert await _restored(vm), "booted cold instead"
        # The image, overlaid with a writable scratch disk of the VM's own.
        assert await _out(vm, "awk '$2 == \"/\" {print $3}' /proc/mounts") == "overlay"
        assert await _out(vm, "echo mine > /root/f && cat /root/f && ls /bin/busybox") == (
            "mine\n/bin/busybox"
        )
        # Both started from one saved CRNG state; the host reseeds each from its own
        # entropy (the guest's RDRAND, where the CPU has it, also mixes in).
        random.append(await _out(vm, "head -c 32 /dev/urandom | od -An -tx1"))
        assert abs(int(await _out(vm, "date +%s")) - time.time()) < 30
    assert random[0] != random[1]
    # a's file is a's alone: the scratch disks are separate
    await a.agent.exec("rm /root/f")
    assert await _out(b, "cat /root/f") == "mine"


async def test_a_template_that_will_not_restore_is_replaced(
    busybox_rootfs: Path, warm_vms: list[MicroVM]
) -> None:
    await (await _warm(busybox_rootfs, warm_vms)).kill()
    template = _template()
    with open(template, "r+b") as f:  # cut short, as by a full disk while it was saved
        f.truncate(4096)
    vm = await _warm(busybox_rootfs, warm_vms)
    assert await _out(vm, "echo up") == "up"
    assert not await _restored(vm), "a cut-short template restored"
    assert not template.exists(), "the broken template was kept"
    vm2 = await _warm(busybox_rootfs, warm_vms)  # makes a new one, which restores
    assert await _restored(vm2) and template.stat().st_size > 4096


async def test_a_restored_guest_that_refuses_its_reseed_boots_cold_and_is_not_retried(
    busybox_rootfs: Path,
    warm_vms: list[MicroVM],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reseed (every copy of a template starts from one CRNG state) is what makes a
    restored guest safe to use: a guest that refuses it is not handed out, and neither
    the GuestError nor the template reaches the caller: it boots cold, and that template
    is not restored again for a while."""
    await (await _warm(busybox_rootfs, warm_vms)).kill()  # the template exists
    real_reseed = AgentClient.reseed

    async def too_short(self: AgentClient, entropy: bytes) -> None:
        await real_reseed(self, entropy[:8])  # the guest's agent refuses under 16 bytes

    monkeypatch.setattr(AgentClient, "reseed", too_short)
    caplog.set_level(logging.INFO, logger="isorun")
    for _ in range(2):
        vm = await _warm(busybox_rootfs, warm_vms)
        assert await _out(vm, "echo up") == "up"
        assert not vm.restored and not await _restored(vm)
    # the second boot went cold at once, without restoring the template again
    assert caplog.text.count("refused") == 1, caplog.text
    assert "not restoring it again" in caplog.text and _template().exists()


async def test_a_template_that_cannot_be_made_is_not_tried_on_every_boot(
    busybox_rootfs: Path,
    warm_vms: list[MicroVM],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Templates go to a full disk (a 1 MiB tmpfs; a template is ~20 MB): saving one fails.
    monkeypatch.setenv("ISORUN_KERNEL", str(artifacts.kernel_path()))
    monkeypatch.setenv("ISORUN_INITRAMFS", str(artifacts.initramfs_path()))
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    full = warm.template_dir()
    full.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "isorun-full", full], check=True)
    try:
        caplog.set_level(logging.INFO, logger="isorun")
        for _ in range(2):
            vm = await _warm(busybox_rootfs, warm_vms)
            assert await _out(vm, "echo up") == "up"
            assert not await _restored(vm)
        # The second boot went cold at once instead of paying a template boot again.
        assert caplog.text.count("making the template") == 1, caplog.text
        assert "not making one again" in caplog.text
        assert sorted(p.suffix for p in full.iterdir()) == [".lock"], "a failed template left"
    finally:
        subprocess.run(["umount", "-l", full], check=False)


async def test_an_unjailed_warm_started_vm_can_be_adopted(
    busybox_rootfs: Path, warm_vms: list[MicroVM]
) -> None:
    # Given its disks as fds and no jail root, nothing else in QEMU's argv names its run
    # dir: a daemon restarting took such a VM for gone and left it running.
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, warm_start=True, jail=False))
    warm_vms.append(vm)
    assert await _restored(vm)
    await vm.detach()
    warm_vms.remove(vm)  # a detached VM is no longer this object's to kill
    try:
        again = await MicroVM.adopt(vm.run_dir)
    except BaseException:
        assert vm.pid is not None
        os.killpg(vm.pid, signal.SIGKILL)
        shutil.rmtree(vm.run_dir, ignore_errors=True)
        raise
    warm_vms.append(again)
    assert await _out(again, "echo adopted") == "adopted"


async def test_an_image_that_is_not_ext4_fails_the_boot_and_keeps_the_template(
    busybox_rootfs: Path, warm_vms: list[MicroVM], tmp_path: Path
) -> None:
    await (await _warm(busybox_rootfs, warm_vms)).kill()
    made = _template().stat().st_ino
    junk = tmp_path / "junk.ext4"
    junk.write_bytes(b"not a filesystem" * 65536)
    with pytest.raises(VMError, match=r"root filesystem .*junk.ext4 did not mount"):
        await _warm(junk, warm_vms)
    assert _template().stat().st_ino == made, "a bad image cost the template"
    assert await _restored(await _warm(busybox_rootfs, warm_vms))


async def test_the_console_says_the_guest_is_ready(
    busybox_rootfs: Path, warm_vms: list[MicroVM]
) -> None:
    vm = await _warm(busybox_rootfs, warm_vms)
    line = "isorun-agent: ready (restored from a template"
    for _ in range(100):  # the console is its own stream: it may trail the agent's answer
        if line in vm.console.tail():
            break
        await asyncio.sleep(0.05)
    assert line in vm.console.tail(), vm.console.tail()


async def test_a_qemu_named_without_a_path_warm_starts(
    busybox_rootfs: Path, warm_vms: list[MicroVM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_QEMU", "qemu-system-x86_64")  # found on PATH, as README allows
    assert await _restored(await _warm(busybox_rootfs, warm_vms))


def _running_qemu(under: Path) -> list[int]:
    def comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    return [pid for pid in qemu_pids_for(under) if comm(pid).startswith("qemu-system")]


def test_a_template_guest_dies_with_the_process_making_it(
    busybox_rootfs: Path, tmp_path: Path
) -> None:
    # A template guest is unjailed and untagged, the host process's helper only: killed
    # mid-template (kill -9: nothing of ours runs), that process must not leave it running.
    env = {
        **os.environ,
        "ISORUN_CACHE": str(tmp_path / "cache"),  # no template there yet
        "ISORUN_STATE_DIR": str(tmp_path / "state"),
        "ISORUN_KERNEL": str(artifacts.kernel_path()),
        "ISORUN_INITRAMFS": str(artifacts.initramfs_path()),
    }
    boot = (
        "import asyncio, sys; from pathlib import Path; from isorun.vmm import MicroVM, VMSpec\n"
        "spec = VMSpec(rootfs=Path(sys.argv[1]), memory_mib=256, scratch_mib=256,"
        " warm_start=True)\n"
        "async def main():\n"
        "    await (await MicroVM.boot(spec)).kill()\n"
        "asyncio.run(main())\n"
    )
    host = subprocess.Popen([sys.executable, "-c", boot, str(busybox_rootfs)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not _running_qemu(tmp_path / "cache"):  # QEMU itself, past its exec wrappers
            assert host.poll() is None and time.monotonic() < deadline, "no template guest"
            time.sleep(0.02)
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 10
    while qemu_pids_for(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_pids_for(tmp_path), "the template guest outlived its host process"
    # Its run dir is left (nothing of ours ran); the next template made long after removes it.
    (left,) = (tmp_path / "state" / "vms").glob("tpl-*")
    long_ago = time.time() - 2 * 3600
    os.utime(left, (long_ago, long_ago))
    subprocess.run([sys.executable, "-c", boot, str(busybox_rootfs)], env=env, check=True)
    assert not left.exists(), "a dead template guest's run dir was kept"
    assert not list((tmp_path / "state" / "vms").iterdir())
