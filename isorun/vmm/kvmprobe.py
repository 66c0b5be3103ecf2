"""Does KVM really run our guest? Boot the guest kernel once under KVM and see.

The CPU's vmx/svm flag and an openable /dev/kvm are necessary, not sufficient: a KVM whose
QEMU aborts setting up the vCPU (here, on a PVM host, `-cpu host` asserts "failed to set MSR
0x10a"), or on which a stock kernel hangs, passes both. So before detection settles on KVM,
the host boots the guest kernel under KVM (2 vCPUs) with no initramfs and no root disk, on
the same machine and kernel command line as a sandbox: a kernel that runs says "Kernel panic
... VFS: Unable to mount root fs" and, with `panic=-1` and `-no-reboot`, QEMU exits. Under
KVM that takes a fraction of a second, once per (QEMU, kernel) per process (the verdict is
kept); the call blocks meanwhile, so async callers run it in a thread. Like the warm
template's boot it runs unjailed: our kernel, no disks, no user input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from isorun.vmm import qemu_cmd

PROBE_TIMEOUT_S = 10.0
PROBE_MEMORY_MIB = 64
PROBE_VCPUS = 2  # a KVM that cannot start a second vCPU fails here, not in a sandbox
# What the guest kernel prints when it ran to the point of looking for a root filesystem
# (any other panic is a kernel that did not get there).
_RAN = b"VFS: Unable to mount root fs"

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
        *qemu_cmd.machine_args(qemu, "kvm", PROBE_VCPUS, PROBE_MEMORY_MIB, kernel, None),
        "-append",
        qemu_cmd.kernel_cmdline(False, "", "kvm"),
        "-serial",
        "stdio",
    ]
    try:
        # its own process group: a QEMU wrapper's children go with it on a timeout
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return f"cannot run {qemu}: {exc}"
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    if _RAN in out:  # it got there (whether or not QEMU exited after)
        return None
    if hung:
        return f"a test guest did not boot under KVM within {timeout:g} s (it hung)"
    said = err.decode("utf-8", "replace").strip().splitlines()
    errors = [line for line in said if "error" in line.lower()] or said[-1:]
    if errors:
        return f"a test guest did not boot under KVM: {errors[0][:300]}"
    last = out.decode("utf-8", "replace").strip().splitlines()[-1:]
    got = f"its console ended {last[0][:200]!r}" if last else "it printed nothing"
    return f"a test guest did not boot under KVM (QEMU exited {proc.returncode}; {got})"
