"""The QEMU command line for one microVM: a pure function, so it is testable alone.

Fastest boot QEMU allows: `-M microvm` (no PCI, no firmware), the uncompressed vmlinux
entered through PVH, an uncompressed initramfs. Under TCG QEMU 7.2 needs pit=on; we set
it everywhere since it is harmless. KVM vs TCG is the one-flag difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT_NAME = "isorun.agent"
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# `-run-with user=` drops root with setgid/setuid *after* the seccomp filter is installed,
# so set*id must stay allowed then; once QEMU is non-root without capabilities the kernel
# itself refuses any return to root, which is what elevateprivileges=deny guards against.
SECCOMP_DROPPING = SECCOMP.replace("elevateprivileges=deny", "elevateprivileges=allow")
TCG_TB_MIB = 128  # bound the translation cache (QEMU's default may grow to 1 GiB)


@dataclass(frozen=True, slots=True)
class LaunchFiles:
    kernel: Path
    initramfs: Path
    rootfs: Path | None
    scratch: Path  # used only with a rootfs
    agent_fd: int  # listening unix socket fds handed to QEMU
    qmp_fd: int
    console_fd: int
    # A vhost-vsock fd with the guest CID already set (vsock.CidLease), or None.
    vsock_fd: int | None = None
    vsock_cid: int | None = None
    vsock_port: int = 0
    # A warm-start template has its disks but does not mount them at boot (vmm/warm.py).
    root_on_cmdline: bool = True
    # A saved machine state to restore instead of booting (an fd QEMU reads it from).
    incoming_fd: int | None = None
    # Disks as fd sets (name -> fds, one per access mode) instead of paths: a restored VM
    # opens its disks only once the state is loaded, by then inside the jail's empty root.
    disk_fds: dict[str, list[int]] = field(default_factory=dict)
    # Where QEMU writes its pid. Its path in QEMU's argv is what ties a running QEMU to its
    # run dir (adopt, orphan cleanup) when nothing else there names it (an unjailed VM
    # given its disks as fds).
    pidfile: Path | None = None


# Under TCG two boot steps cost more than the rest of the kernel's boot put together:
# - calibrating the local APIC timer against the PIT (~250 ms; KVM guests skip it through
#   the TSC-deadline timer, which TCG lacks): the PIT drives the tick instead;
# - rewriting every `lock` prefix for one CPU (~55 ms of text_poke, each a TLB flush).
TCG_ONLY_CMDLINE = ("noapictimer", "noreplace-smp")

# With ERMS/FSRM the guest kernel (and glibc) copy and clear memory with `rep movsb` /
# `rep stosb`, which TCG runs a byte per loop iteration; without them the kernel takes its
# unrolled 8-byte loops. Measured here (TCG, same run): unpacking a 7.5 MB initramfs 116 ->
# 72 ms; stdout through the agent 22 -> 68 MiB/s, file upload 19 -> 35, download 65 -> 114.
# KVM guests get the host's CPU (KVM_CPU): real hardware runs `rep movsb` fastest.
TCG_CPU = "max,-erms,-fsrm"
# Under KVM the host's CPU, without VMX/SVM: with the host's nested virtualization on (the
# default of current kernels) a guest could otherwise drive the host's nested-hypervisor
# code, the source of several guest-to-host escapes. A sandbox runs no hypervisor of its own.
KVM_CPU = "host,-vmx,-svm"


def kernel_cmdline(
    has_root: bool, extra: str, accel: str, vsock_port: int = 0, tsc_khz: int | None = None
) -> str:
    """tsc_khz: the host's TSC rate (vmm/tsc.py), which a TCG guest's TSC runs at; the
    guest cannot measure it, and without it keeps time in 4 ms jiffies."""
    parts = [
        "console=ttyS0",
        "quiet",
        "loglevel=3",
        "panic=-1",  # reboot at once on panic; -no-reboot turns that into an exit we can see
        "reboot=t",
        "tsc=reliable",
        "no_timer_check",
        "i8042.noaux",
        "random.trust_cpu=on",
    ]
    if accel != "kvm":
        parts += TCG_ONLY_CMDLINE
        if tsc_khz:
            parts.append(f"tsc_early_khz={tsc_khz}")
    if has_root:
        parts += ["isorun.root=/dev/vda", "isorun.scratch=/dev/vdb"]
    if vsock_port:
        parts.append(f"isorun.vsock={vsock_port}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def machine_args(
    qemu: str, accel: str, vcpus: int, memory_mib: int, kernel: Path, initramfs: Path | None
) -> list[str]:
    """The machine itself: accelerator, CPU, memory, kernel and initramfs (no devices, no
    command line). The boot benchmark's bare baseline and the KVM probe (without an
    initramfs) start from exactly these."""
    accel_arg = "kvm" if accel == "kvm" else f"tcg,tb-size={TCG_TB_MIB}"
    initrd = ["-initrd", str(initramfs)] if initramfs is not None else []
    return [
        qemu,
        "-M",
        "microvm,pit=on,pic=on,rtc=on,isa-serial=on,acpi=off",
        "-accel",
        accel_arg,
        "-cpu",
        KVM_CPU if accel == "kvm" else TCG_CPU,
        "-smp",
        str(vcpus),
        "-m",
        f"{memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        *initrd,
    ]


def build(
    qemu: str,
    accel: str,
    vcpus: int,
    memory_mib: int,
    files: LaunchFiles,
    extra_cmdline: str = "",
    run_as: str | None = None,
    chroot: Path | None = None,
    sandbox: bool = True,
    tsc_khz: int | None = None,
) -> list[str]:
    argv = [
        *machine_args(qemu, accel, vcpus, memory_mib, files.kernel, files.initramfs),
        "-append",
        kernel_cmdline(
            files.rootfs is not None and files.root_on_cmdline,
            extra_cmdline,
            accel,
            files.vsock_port,
            tsc_khz,
        ),
        "-chardev",
        f"socket,id=console,fd={files.console_fd},server=on,wait=off",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,fd={files.qmp_fd},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        f"socket,id=agent,fd={files.agent_fd},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        # No virtio-rng device (the kernel keeps its driver): under TCG its probe and the
        # hwrng thread filling the pool cost a cold boot ~110-130 ms (same-run A/B, 6+6
        # boots, twice). The CRNG is ready at boot from the CPU's RDRAND
        # (random.trust_cpu=on; TCG's `max` and KVM's `host` CPUs have it), as in
        # Firecracker's default; a warm start is reseeded by the host over the agent channel.
    ]
    if files.vsock_fd is not None:
        argv += [
            "-device",
            f"vhost-vsock-device,guest-cid={files.vsock_cid},vhostfd={files.vsock_fd}",
        ]
    fd_lists = dict(files.disk_fds)
    if files.incoming_fd is not None:
        fd_lists["state"] = [files.incoming_fd]
    fdset: dict[str, str] = {}
    for set_id, (name, fds) in enumerate(sorted(fd_lists.items()), start=1):
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={set_id},opaque={name}"]
        fdset[name] = f"/dev/fdset/{set_id}"
    if files.rootfs is not None:
        for name, path, readonly in (
            ("root", files.rootfs, True),
            ("scratch", files.scratch, False),
        ):
            argv += _disk(name, fdset.get(name, path), readonly, from_fdset=name in fdset)
    if "state" in fdset:
        argv += ["-incoming", f"file:{fdset['state']}"]
    if files.pidfile is not None:
        argv += ["-pidfile", str(files.pidfile)]  # a plain path: no option-string escaping
    if sandbox:
        argv += ["-sandbox", SECCOMP_DROPPING if run_as else SECCOMP]
    run_with = []
    if run_as:
        run_with.append(f"user={run_as}")
    if chroot is not None:
        run_with.append(f"chroot={_escape(chroot)}")
    if run_with:
        argv += ["-run-with", ",".join(run_with)]
    return argv


def _disk(name: str, path: Path | str, readonly: bool, from_fdset: bool = False) -> list[str]:
    ro = "on" if readonly else "off"
    # werror/rerror=report: a host error (the sparse scratch file's filesystem full) is the
    # guest's I/O error. QEMU's default stops the whole VM on ENOSPC, silently: the sandbox
    # froze, every request timing out, with no death reason.
    opts = (
        f"file={_escape(path)},if=none,id={name},format=raw,readonly={ro},cache=unsafe,"
        "aio=threads,werror=report,rerror=report"
    )
    if from_fdset:
        # The set's read-only and read-write fds are two open files: QEMU's own image
        # locks would refuse one for the other. The files are this VM's alone anyway.
        opts += ",file.locking=off"
    return [
        "-drive",
        opts,
        "-device",
        f"virtio-blk-device,drive={name}",
    ]


def _escape(path: Path | str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return str(path).replace(",", ",,")
