"""Missing pieces and bad specs get errors that say what to install or change."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from isorun.errors import ConfigError, VMError
from isorun.vmm import MicroVM, VMSpec, accel, artifacts, kvmprobe, scratch, vsock


async def test_missing_kernel_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"make guest.*ISORUN_KERNEL"):
        await MicroVM.boot(VMSpec(kernel=tmp_path / "nope"))


async def test_missing_qemu_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISORUN_QEMU", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="apt-get install -t bookworm-backports qemu-system-x86"):
        artifacts.qemu_binary()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("vcpus", 0, "vcpus=0"), ("memory_mib", 10**9, "memory_mib"), ("scratch_mib", 1, "scratch")],
)
def test_bad_spec_names_the_field(field: str, value: int, message: str) -> None:
    spec = VMSpec()
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match=message):
        spec.validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mib", 300.5),
        ("vcpus", True),
        ("scratch_mib", "256"),
        ("boot_attempts", 1.0),
        ("boot_timeout", float("nan")),
        ("boot_timeout", float("inf")),
    ],
)
def test_a_spec_value_of_the_wrong_kind_names_the_field(field: str, value: object) -> None:
    spec = VMSpec()
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match=f"{field}="):
        spec.validate()


def test_a_device_node_that_cannot_be_opened_is_not_usable(tmp_path: Path) -> None:
    # Root passes any access() check; a node with no driver behind it exists but does not
    # open. KVM and vsock must then not be chosen, or every boot fails.
    node = tmp_path / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(250, 77))  # a major no driver has
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu vmx sse2\n")
    choice = accel.detect("auto", kvm_dev=node, cpuinfo_path=cpuinfo)
    assert choice.name == "tcg" and "cannot be opened" in choice.reason
    with pytest.raises(ConfigError, match=r"kvm requested but .*cannot be opened"):
        accel.detect("kvm", kvm_dev=node, cpuinfo_path=cpuinfo)
    assert vsock.choose("auto", device=node).name == "serial"


def test_missing_rootfs_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        VMSpec(rootfs=tmp_path / "missing.ext4").validate()


def test_pvm_like_host_gets_tcg(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 hypervisor\n")
    choice = accel.detect("auto", kvm_dev=dev, cpuinfo_path=cpuinfo)
    assert choice.name == "tcg"
    assert "vmx/svm" in choice.reason


def test_real_vt_host_gets_kvm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu vmx sse2\n")
    assert accel.detect("auto", kvm_dev=dev, cpuinfo_path=cpuinfo).name == "kvm"


def test_no_device_gets_tcg_and_forced_kvm_without_device_is_an_error(tmp_path: Path) -> None:
    assert accel.detect("auto", kvm_dev=tmp_path / "none").name == "tcg"
    with pytest.raises(ConfigError, match="kvm requested"):
        accel.detect("kvm", kvm_dev=tmp_path / "none")
    with pytest.raises(ConfigError, match="not one of"):
        accel.detect("hvf")


def test_this_machine_reports_its_choice() -> None:
    choice = accel.detect()
    assert choice.name in ("kvm", "tcg") and choice.reason


async def test_a_file_that_is_no_kernel_fails_with_qemus_reason(tmp_path: Path) -> None:
    from isorun.errors import VMError

    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"not a kernel" * 100)
    with pytest.raises(VMError) as info:
        await MicroVM.boot(VMSpec(kernel=bogus, boot_timeout=20))
    assert "QEMU exited during boot" in str(info.value)
    assert "kernel" in str(info.value).lower()  # QEMU's own complaint is passed on


@pytest.mark.skipif(os.geteuid() != 0, reason="the jail (and its unshare) is used as root only")
async def test_a_boot_failing_before_qemu_starts_closes_its_sockets_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, initramfs = tmp_path / "vmlinux", tmp_path / "initramfs.cpio"
    kernel.write_bytes(b"k")
    initramfs.write_bytes(b"i")
    monkeypatch.setenv("ISORUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ISORUN_QEMU", "/usr/bin/qemu-system-x86_64")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `unshare`: fails after the listen
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="unshare") as info:
        await MicroVM.boot(VMSpec(kernel=kernel, initramfs=initramfs, channel="serial"))
    # While the caller still holds the error, nothing it made stays open or on disk.
    assert set(os.listdir("/proc/self/fd")) <= fds_before
    assert list((tmp_path / "state" / "vms").iterdir()) == []
    del info


async def test_a_cancelled_scratch_tool_does_not_run_on(tmp_path: Path) -> None:
    # mkfs/cp for a scratch disk run as children: a boot cancelled meanwhile must not
    # leave them writing into the cache.
    marker = tmp_path / "still-running"
    task = asyncio.create_task(scratch._run("sh", "-c", f"sleep 1; touch {marker}"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(1.5)
    assert not marker.exists(), "the tool ran on after its caller was cancelled"


async def test_kvm_that_qemu_cannot_set_up_falls_back_to_tcg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busybox_rootfs: Path
) -> None:
    # A host whose CPU and /dev/kvm say KVM, and whose KVM booted the probe's test guest,
    # but QEMU's KVM setup fails later (another hypervisor took VT-x meanwhile: EBUSY).
    # Detection chose KVM by itself: the boot goes on under TCG, and so do later ones. Here
    # a QEMU wrapper fails that way for -accel kvm only.
    real = artifacts.qemu_binary()
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do if [ "$a" = kvm ]; then\n'
        '  echo "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Device or resource'
        ' busy" >&2; exit 1\n'
        "fi; done\n"
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("ISORUN_QEMU", str(fake))
    dev, cpuinfo = tmp_path / "kvm", tmp_path / "cpuinfo"
    dev.write_text("")
    cpuinfo.write_text("flags\t\t: fpu vmx sse2\n")
    detect = accel.detect
    monkeypatch.setattr(
        accel,
        "detect",
        lambda req=None, probe=None: detect(req, kvm_dev=dev, cpuinfo_path=cpuinfo, probe=probe),
    )
    monkeypatch.setattr(kvmprobe, "kvm_boots_a_guest", lambda qemu, kernel: None)
    monkeypatch.setattr(accel, "_kvm_refused", None)
    assert accel.detect().name == "kvm"
    vm = await MicroVM.boot(VMSpec(rootfs=busybox_rootfs, memory_mib=256, scratch_mib=256))
    try:
        assert vm.accel.name == "tcg" and "failed to initialize kvm" in vm.accel.reason
        assert (await vm.agent.exec("echo up")).stdout == b"up\n"
    finally:
        await vm.kill()
    later = accel.detect()
    assert later.name == "tcg" and "could not use KVM earlier" in later.reason
    # asked for (ISORUN_ACCEL=kvm, e.g. a PVM guest kernel): no quiet fallback
    monkeypatch.setattr(accel, "_kvm_refused", None)
    with pytest.raises(VMError, match="failed to initialize kvm"):
        await MicroVM.boot(
            VMSpec(rootfs=busybox_rootfs, memory_mib=256, scratch_mib=256, accel="kvm")
        )
