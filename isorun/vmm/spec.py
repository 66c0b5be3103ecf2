"""What a microVM is made of: the user's request, validated before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from isorun.errors import ConfigError
from isorun.vmm.rundir import state_root

MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 256 * 1024


@dataclass(slots=True)
class VMSpec:
    rootfs: Path | None = None  # read-only ext4 image disk; None runs from the initramfs
    vcpus: int = 1
    memory_mib: int = 512
    scratch_mib: int = 2048  # writable copy-on-write layer (sparse: costs only what is written)
    kernel: Path | None = None
    initramfs: Path | None = None
    accel: str | None = None  # auto | kvm | tcg
    channel: str | None = None  # agent channel: auto | serial | vsock (ISORUN_CHANNEL)
    boot_timeout: float = 15.0
    boot_attempts: int = 2
    extra_cmdline: str = ""
    jail: bool = True
    # Restore a booted template of this machine shape instead of booting the kernel
    # (vmm/warm.py); falls back to a cold boot where it cannot apply.
    warm_start: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # Run dirs go in <state_dir>/vms; None: $ISORUN_STATE_DIR, else /var/lib/isorun. A
    # daemon passes its own, so the VMs it looks for after a crash are where it put them.
    state_dir: Path | None = None

    def runs_dir(self) -> Path:
        return Path(self.state_dir or state_root()) / "vms"

    def validate(self) -> None:
        for name in ("vcpus", "memory_mib", "scratch_mib", "boot_attempts"):
            value = getattr(self, name)
            # bool is an int to Python, and a float passes the range checks below only to
            # fail later in a cgroup write or QEMU's argv, no longer naming the field
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} must be a whole number")
        if not isinstance(self.boot_timeout, int | float) or not math.isfinite(self.boot_timeout):
            raise ConfigError(f"boot_timeout={self.boot_timeout!r} must be a finite number")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"vcpus={self.vcpus} must be between 1 and {MAX_VCPUS}")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(
                f"memory_mib={self.memory_mib} must be between "
                f"{MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
            )
        if not 16 <= self.scratch_mib <= 2 * 1024 * 1024:
            raise ConfigError(f"scratch_mib={self.scratch_mib} must be between 16 and 2097152")
        if self.rootfs is not None and not Path(self.rootfs).is_file():
            raise ConfigError(f"root filesystem image {self.rootfs} does not exist")
        if self.boot_timeout <= 0 or self.boot_attempts < 1:
            raise ConfigError("boot_timeout must be > 0 and boot_attempts >= 1")
        if any(c in self.extra_cmdline for c in "\n\x00"):
            raise ConfigError("extra_cmdline must be one line")
