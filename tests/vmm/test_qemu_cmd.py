"""The kernel command line differs between KVM and TCG only where TCG needs it."""

from dataclasses import replace
from pathlib import Path
from typing import Any

from isorun.vmm import qemu_cmd


def _files(**overrides: Any) -> qemu_cmd.LaunchFiles:
    """A VM's files with an image disk at /img.ext4: fds 3-5 for agent, QMP, console."""
    base: dict[str, Any] = {
        "kernel": Path("/k"),
        "initramfs": Path("/i"),
        "rootfs": Path("/img.ext4"),
        "scratch": Path("/s.ext4"),
        "agent_fd": 3,
        "qmp_fd": 4,
        "console_fd": 5,
    }
    return qemu_cmd.LaunchFiles(**{**base, **overrides})


def test_tcg_skips_the_apic_timer_calibration_and_smp_unpatching() -> None:
    tcg = qemu_cmd.kernel_cmdline(True, "", "tcg").split()
    assert "noapictimer" in tcg and "noreplace-smp" in tcg
    assert "isorun.root=/dev/vda" in tcg


def test_a_tcg_guest_is_told_the_hosts_tsc_rate_and_a_kvm_guest_is_not() -> None:
    # The TCG guest cannot calibrate its TSC (vmm/tsc.py); a KVM guest has kvm-clock.
    assert "tsc_early_khz=2500000" in qemu_cmd.kernel_cmdline(False, "", "tcg", 0, 2500000)
    assert "tsc_early_khz" not in qemu_cmd.kernel_cmdline(False, "", "tcg", 0, None)
    assert "tsc_early_khz" not in qemu_cmd.kernel_cmdline(False, "", "kvm", 0, 2500000)


def test_kvm_guests_keep_their_local_apic_timer() -> None:
    # KVM has the TSC-deadline timer, so the calibration costs nothing there; the PIT
    # broadcast tick that replaces it under TCG would only cost KVM guests exits.
    kvm = qemu_cmd.kernel_cmdline(False, "quiet", "kvm").split()
    assert "noapictimer" not in kvm and "noreplace-smp" not in kvm
    assert not any(p.startswith("isorun.root=") for p in kvm)


def test_a_vsock_channel_adds_the_device_with_the_reserved_cid_and_tells_the_agent() -> None:
    files = _files(rootfs=None, vsock_fd=6, vsock_cid=1234567, vsock_port=1024)
    argv = qemu_cmd.build("qemu", "kvm", 1, 256, files)
    assert "vhost-vsock-device,guest-cid=1234567,vhostfd=6" in argv
    assert "isorun.vsock=1024" in argv[argv.index("-append") + 1].split()
    # The serial port stays in every VM: the agent serves both.
    assert f"virtserialport,chardev=agent,name={qemu_cmd.AGENT_PORT_NAME}" in argv
    plain = qemu_cmd.build("qemu", "kvm", 1, 256, replace(files, vsock_fd=None, vsock_port=0))
    assert not any("vsock" in a for a in plain)


def test_a_restored_vm_reads_its_state_and_disks_from_fd_sets() -> None:
    # Jailed, QEMU opens its disks only after the state has loaded, from inside an empty
    # root: paths would not resolve there, the fds it was handed do.
    files = _files(incoming_fd=9, disk_fds={"root": [6], "scratch": [7, 8]})
    argv = qemu_cmd.build("qemu", "tcg", 1, 256, files)
    add_fd = [argv[i + 1] for i, a in enumerate(argv) if a == "-add-fd"]
    sets = {opt.split(",")[0]: opt for opt in add_fd}
    assert len(add_fd) == 4 and set(sets) == {"fd=6", "fd=7", "fd=8", "fd=9"}
    set_of = {fd: sets[f"fd={fd}"].split(",")[1].removeprefix("set=") for fd in (6, 7, 8, 9)}
    assert set_of[7] == set_of[8] and len({set_of[6], set_of[7], set_of[9]}) == 3
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[0].startswith(f"file=/dev/fdset/{set_of[6]},") and "readonly=on" in drives[0]
    assert drives[1].startswith(f"file=/dev/fdset/{set_of[7]},")
    assert all("file.locking=off" in d for d in drives)
    assert argv[argv.index("-incoming") + 1] == f"file:/dev/fdset/{set_of[9]}"
    assert "/img.ext4" not in " ".join(argv)
    # No disk path left to tie the process to its run dir: the pid file's does.
    argv = qemu_cmd.build("qemu", "tcg", 1, 256, replace(files, pidfile=Path("/run/v,1/q.pid")))
    assert argv[argv.index("-pidfile") + 1] == "/run/v,1/q.pid"


def test_a_warm_start_template_has_its_disks_but_does_not_mount_them() -> None:
    files = _files(root_on_cmdline=False)
    argv = qemu_cmd.build("qemu", "tcg", 1, 256, files)
    assert argv.count("-drive") == 2 and "-incoming" not in argv
    assert "isorun.root" not in argv[argv.index("-append") + 1]


def test_a_kvm_guest_gets_the_hosts_cpu_without_nested_virtualization() -> None:
    argv = qemu_cmd.build("qemu", "kvm", 1, 256, _files())
    cpu = argv[argv.index("-cpu") + 1].split(",")
    assert cpu[0] == "host" and {"-vmx", "-svm"} <= set(cpu[1:]), cpu
