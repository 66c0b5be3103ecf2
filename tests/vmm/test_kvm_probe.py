"""Detection boots the guest kernel under KVM once before settling on KVM (vmm/kvmprobe.py):
a KVM that passes the flag and device checks but cannot run the guest gets TCG."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from isorun.vmm import MicroVM, VMSpec, accel, artifacts, kvmprobe


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvmprobe, "_verdicts", {})
    monkeypatch.setattr(accel, "_kvm_refused", None)


def _qemu_wrapper(tmp_path: Path, body: str) -> str:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return str(fake)


def _vt_host(tmp_path: Path) -> tuple[Path, Path]:
    dev, cpuinfo = tmp_path / "kvm", tmp_path / "cpuinfo"
    dev.write_text("")
    cpuinfo.write_text("flags\t\t: fpu vmx sse2\n")
    return dev, cpuinfo


def test_a_kvm_that_runs_the_kernel_is_chosen(tmp_path: Path) -> None:
    # A KVM stand-in that works: the probe's own command line under TCG, so the real guest
    # kernel runs to its panic (no initramfs, no root) and QEMU exits.
    real = artifacts.qemu_binary()
    qemu = _qemu_wrapper(
        tmp_path,
        'for a in "$@"; do shift; case "$a" in kvm) a=tcg;; host,-vmx,-svm) a=max;; esac\n'
        '  set -- "$@" "$a"; done\n'
        f'exec {real} "$@"',
    )
    kernel = artifacts.kernel_path(None)
    assert kvmprobe.kvm_boots_a_guest(qemu, kernel) is None
    dev, cpuinfo = _vt_host(tmp_path)
    choice = accel.detect(
        "auto", dev, cpuinfo, probe=lambda: kvmprobe.kvm_boots_a_guest(qemu, kernel)
    )
    assert choice.name == "kvm" and "a test guest booted" in choice.reason, choice


def test_a_kvm_on_which_the_guest_hangs_gets_tcg_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a wrapper that does not exec: its child must go with it on the timeout
    sleeper = f"sleep 61.{os.getpid()}"
    qemu = _qemu_wrapper(tmp_path, sleeper)
    kernel = artifacts.kernel_path(None)
    probes = 0
    probe = kvmprobe._probe

    def counted(*args: object) -> str | None:
        nonlocal probes
        probes += 1
        return probe(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(kvmprobe, "_probe", counted)
    dev, cpuinfo = _vt_host(tmp_path)

    def choose() -> accel.AccelChoice:
        return accel.detect(
            "auto", dev, cpuinfo, probe=lambda: kvmprobe.kvm_boots_a_guest(qemu, kernel, 1.0)
        )

    t0 = time.monotonic()
    choice = choose()
    assert time.monotonic() - t0 < 10  # not held up by the wrapper's child
    assert choice.name == "tcg" and "within 1 s" in choice.reason, choice
    assert "hung" in choice.reason
    assert choose() == choice and probes == 1  # the verdict is kept
    # asked for by name: no probe, no fallback
    assert accel.detect("kvm", dev, cpuinfo, probe=lambda: "broken").name == "kvm"
    for left in (sleeper, qemu):
        assert subprocess.run(["pgrep", "-f", left], check=False).returncode == 1, left


def test_a_kvm_whose_qemu_fails_gets_tcg_in_qemus_words(tmp_path: Path) -> None:
    qemu = _qemu_wrapper(
        tmp_path,
        'echo "qemu-system-x86_64: warning: ignored" >&2\n'
        'echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069" >&2\n'
        'echo "qemu: kvm.c:3849: kvm_buf_set_msrs: Assertion failed." >&2\n'
        "kill -ABRT $$",
    )
    why = kvmprobe.kvm_boots_a_guest(qemu, artifacts.kernel_path(None))
    assert why is not None and "failed to set MSR 0x10a" in why, why


def _has_virt_flags() -> bool:
    return bool(accel.cpu_flags(Path("/proc/cpuinfo").read_text()) & {"vmx", "svm"})


@pytest.mark.skipif(
    not os.path.exists("/dev/kvm") or _has_virt_flags(),
    reason="needs a /dev/kvm without VT-x/AMD-V (a PVM host, as these are)",
)
def test_this_pvm_hosts_kvm_does_not_run_the_guest() -> None:
    # The real device: what detection would learn here if the CPU flags did not stop it.
    why = kvmprobe.kvm_boots_a_guest(artifacts.qemu_binary(), artifacts.kernel_path(None))
    assert why is not None and "did not boot under KVM" in why, why


@pytest.mark.parametrize(
    ("console", "named"),
    [
        # a kernel that panicked before it looked for a root disk did not boot
        ("Kernel panic - not syncing: IO-APIC + timer doesn't work!", "IO-APIC"),
        ("", "printed nothing"),
    ],
)
def test_a_guest_that_stops_short_of_the_root_disk_did_not_boot(
    tmp_path: Path, console: str, named: str
) -> None:
    qemu = _qemu_wrapper(tmp_path, f'echo "{console}"; exit 0')
    why = kvmprobe.kvm_boots_a_guest(qemu, artifacts.kernel_path(None))
    assert why is not None and named in why, why


async def test_machines_boot_under_what_the_probe_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busybox_rootfs: Path
) -> None:
    # A host that looks like a VT-x one, whose KVM fails the probe: boots, templates and the
    # daemon's start all choose TCG, naming why.
    dev, cpuinfo = _vt_host(tmp_path)
    detect = accel.detect
    monkeypatch.setattr(
        accel,
        "detect",
        lambda req=None, probe=None: detect(req, kvm_dev=dev, cpuinfo_path=cpuinfo, probe=probe),
    )
    asked: list[object] = []

    def broken(qemu: str, kernel: Path) -> str:
        asked.append(kernel)
        return "a test guest did not boot under KVM: broken"

    monkeypatch.setattr(kvmprobe, "kvm_boots_a_guest", broken)
    spec = VMSpec(rootfs=busybox_rootfs, memory_mib=256, scratch_mib=256)
    assert MicroVM.accel_for(spec).reason.endswith("broken")
    vm = await MicroVM.boot(spec)
    try:
        assert vm.accel.name == "tcg" and vm.accel.reason.endswith("broken"), vm.accel
        assert (await vm.agent.exec("echo up")).stdout == b"up\n"
    finally:
        await vm.kill()
    assert asked and set(asked) == {artifacts.kernel_path(None)}
