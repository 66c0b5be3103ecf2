"""Choose KVM only when it can really run a standard guest; TCG otherwise.

`/dev/kvm` alone lies: PVM hosts expose it without VT-x/AMD-V, and a stock guest kernel
hangs there. So KVM needs the device usable, the vmx/svm CPU flag *and*, where the caller
gives one, a probe that boots the guest kernel under KVM (vmm/kvmprobe.py), unless the user
forces it (ISORUN_ACCEL=kvm, e.g. with their own PVM guest kernel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isorun.errors import ConfigError
from isorun.vmm.devnode import open_error


@dataclass(frozen=True, slots=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


# Set once QEMU could not use KVM that detect() chose by itself (another hypervisor holds
# VT-x, a broken nested setup): the rest of this process boots under TCG.
_kvm_refused: str | None = None


def kvm_init_failure(qemu_said: str) -> str | None:
    """QEMU's line saying it could not set up KVM, if `qemu_said` has one."""
    for line in qemu_said.splitlines():
        low = line.lower()
        if "kvm" in low and ("failed to initialize" in low or "could not access" in low):
            return line.strip()
    return None


def fall_back_to_tcg(why: str) -> AccelChoice:
    """QEMU could not use the KVM detect() chose: TCG, for this boot and the ones after."""
    global _kvm_refused
    _kvm_refused = why
    return AccelChoice("tcg", f"QEMU could not use KVM: {why}")


def first_cpu_fields(cpuinfo: str) -> dict[str, str]:
    """/proc/cpuinfo's text for its first CPU, field by field ("flags", "model", ...)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU feature flags /proc/cpuinfo's text names (its first CPU's)."""
    return set(first_cpu_fields(cpuinfo).get("flags", "").split())


def _cpu_has_virt(cpuinfo: str) -> bool:
    return bool(cpu_flags(cpuinfo) & {"vmx", "svm"})


def detect(
    requested: str | None = None,
    kvm_dev: Path = Path("/dev/kvm"),
    cpuinfo_path: Path = Path("/proc/cpuinfo"),
    probe: Callable[[], str | None] | None = None,
) -> AccelChoice:
    """`probe`: None when KVM boots a test guest, else why not (kvmprobe, which keeps its
    verdict); run only when everything else says KVM."""
    want = (requested or os.environ.get("ISORUN_ACCEL") or "auto").lower()
    if want not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"accel '{want}' is not one of auto, kvm, tcg (ISORUN_ACCEL)")
    if want == "tcg":
        return AccelChoice("tcg", "requested")
    unusable = open_error(kvm_dev)
    if want == "kvm":
        if unusable:
            raise ConfigError(f"accel kvm requested but {unusable}")
        return AccelChoice("kvm", "requested")
    if unusable:
        return AccelChoice("tcg", unusable)
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        cpuinfo = ""
    if not _cpu_has_virt(cpuinfo):
        return AccelChoice(
            "tcg", f"{kvm_dev} exists but the CPU has no vmx/svm flag (PVM or nested-less host)"
        )
    if _kvm_refused is not None:
        return AccelChoice("tcg", f"QEMU could not use KVM earlier: {_kvm_refused}")
    if probe is not None and (why := probe()) is not None:
        return AccelChoice("tcg", why)
    booted = ", a test guest booted" if probe is not None else ""
    return AccelChoice("kvm", f"vmx/svm present, /dev/kvm usable{booted}")
