"""The kernel command line differs between KVM and TCG only where TCG needs it."""

from dataclasses import replace
from pathlib import Path

from isorun.vmm import qemu_cmd


def test_tcg_skips_the_apic_timer_calibration_and_smp_unpatching() -> None:
    tcg = qemu_cmd.kernel_cmdline(True, "", "tcg").split()
    assert "noapictimer" in tcg and "noreplace-smp" in tcg
    assert "isorun.root=/dev/vda" in tcg


def test_kvm_guests_keep_their_local_apic_timer() -> None:
    # KVM has the TSC-deadline timer, so the calibration costs nothing there; the PIT
    # broadcast tick that replaces it under TCG would only cost KVM guests exits.
    kvm = qemu_cmd.kernel_cmdline(False, "quiet", "kvm").split()
    assert "noapictimer" not in kvm and "noreplace-smp" not in kvm
    assert not any(p.startswith("isorun.root=") for p in kvm)


def test_a_vsock_channel_adds_the_device_with_the_reserved_cid_and_tells_the_agent() -> None:
    files = qemu_cmd.LaunchFiles(
        kernel=Path("/k"),
        initramfs=Path("/i"),
        rootfs=None,
        scratch=Path("/s"),
        agent_fd=3,
        qmp_fd=4,
        console_fd=5,
        vsock_fd=6,
        vsock_cid=1234567,
        vsock_port=1024,
    )
    argv = qemu_cmd.build("qemu", "kvm", 1, 256, files)
    assert "vhost-vsock-device,guest-cid=1234567,vhostfd=6" in argv
    assert "isorun.vsock=1024" in argv[argv.index("-append") + 1].split()
    # The serial port stays in every VM: the agent serves both.
    assert f"virtserialport,chardev=agent,name={qemu_cmd.AGENT_PORT_NAME}" in argv
    plain = qemu_cmd.build("qemu", "kvm", 1, 256, replace(files, vsock_fd=None, vsock_port=0))
    assert not any("vsock" in a for a in plain)
