"""Does KVM really run our guest? Boot the guest kernel once under KVM and see.

The CPU's vmx/svm flag and an openable /dev/kvm are necessary, not sufficient: a KVM whose
QEMU aborts setting up the vCPU (here, on a PVM host, `-cpu host` asserts "failed to set MSR
0x10a"), or on which a stock kernel hangs, passes both. So before detection settles on KVM,
the host boots the guest kernel under KVM with no initramfs and no root disk, on the same
machine and kernel command line as a sandbox: a kernel that runs says "Kernel panic ... VFS:
Unable to mount root fs" and, with `panic=-1` and `-no-reboot`, QEMU exits. Under KVM that
takes a fraction of a second, once per process (the verdict is kept); the call blocks
meanwhile. Like the warm template's boot it runs unjailed: our kernel, no disks, no user
input.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from isorun.vmm import qemu_cmd

PROBE_TIMEOUT_S = 10.0
PROBE_MEMORY_MIB = 64
# What the guest kernel prints when it ran to the point of looking for a root filesystem.
_RAN = b"Kernel panic"

_verdicts: dict[tuple[str, Path], str | None] = {}
_lock = threading.Lock()


def kvm_boots_a_guest(qemu: str, kernel: Path, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `kernel` ran under KVM in `qemu`; else why not, in QEMU's words where it
    gave any. Kept per (qemu, kernel) for the life of the process."""
    key = (qemu, kernel)
    with _lock:  # one probe at a time: two boots at once would both probe otherwise
        if key not in _verdicts:
            _verdicts[key] = _probe(qemu, kernel, timeout)
        return _verdicts[key]


def _probe(qemu: str, kernel: Path, timeout: float) -> str | None:
    argv = [
        *qemu_cmd.machine_args(qemu, "kvm", 1, PROBE_MEMORY_MIB, kernel, None),
        "-append",
        qemu_cmd.kernel_cmdline(False, "", "kvm"),
        "-serial",
        "stdio",
    ]
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"a test guest did not boot under KVM within {timeout:g} s (it hung)"
    except OSError as exc:
        return f"cannot run {qemu}: {exc}"
    if _RAN in done.stdout:
        return None
    said = done.stderr.decode("utf-8", "replace").strip().splitlines()
    errors = [line for line in said if "error" in line.lower()] or said[-1:]
    why = errors[0][:300] if errors else f"QEMU exited {done.returncode} saying nothing"
    return f"a test guest did not boot under KVM: {why}"
