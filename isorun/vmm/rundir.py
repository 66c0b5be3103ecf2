"""What the host can learn of, and do to, a VM from its run dir alone, with no MicroVM:
a daemon that restarted, or one cleaning up after a crash, has only the directory. Whether
its QEMU still runs, why it ended, what it used, its console, its labels; kill and remove."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

from isorun.vmm.cgroup import VMCgroup
from isorun.vmm.console import read_tail
from isorun.vmm.mempeak import MemoryPeak
from isorun.vmm.process import alive, argv_of

CONSOLE_LOG = "console.log"  # in the run dir; a re-adopting daemon appends to it


def state_root() -> Path:
    return Path(os.environ.get("ISORUN_STATE_DIR", "/var/lib/isorun"))


def running_pid(run_dir: Path) -> int | None:
    """The pid of the VM process of `run_dir` if it still runs (and is still that VM)."""
    try:
        pid = int(json.loads((run_dir / "vm.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid <= 1 or not alive(pid) or not _names(argv_of(pid), run_dir):
        return None  # gone, or the pid was reused by another process
    return pid


def _names(argv: list[str], run_dir: Path) -> bool:
    """Whether a command line names `run_dir` or a file in it (QEMU's name its pidfile,
    disks and jail), not merely a path that starts the same (vms/ab in vms/abc/...)."""
    d = str(run_dir)
    return any(arg == d or d + "/" in arg for arg in argv)


# Template guests' run dirs: no sandbox owns them, so no daemon re-adopts or removes them.
TEMPLATE_VM_PREFIX = "tpl-"
TEMPLATE_VM_STALE_S = 3600.0  # a template takes seconds to make


def remove_dead_template_vms(runs_dir: Path) -> None:
    """Run dirs (and cgroups) in `runs_dir` of template guests whose host process was killed
    while making them (the guest died with it: --pdeathsig), left long ago."""
    cutoff = time.time() - TEMPLATE_VM_STALE_S
    for d in runs_dir.glob(f"{TEMPLATE_VM_PREFIX}*"):
        with contextlib.suppress(OSError):
            if d.stat().st_mtime < cutoff and running_pid(d) is None:
                remove_run_dir(d)


def oom_death_reason(cgroup: VMCgroup, memory_mib: int | None = None) -> str | None:
    """Why a VM died if the kernel's OOM killer ended its QEMU (None if it did not);
    `memory_mib` is the guest's RAM, when known."""
    match cgroup.oom_kill():
        case "limit":
            # the limit in effect (normally guest RAM + QEMU_OVERHEAD_MIB), as the kernel saw it
            limit = cgroup.memory_limit()
            of = f" of {limit >> 20} MiB" if limit is not None else ""
            guest = f" for a {memory_mib} MiB guest" if memory_mib is not None else ""
            return f"out of memory: QEMU was killed at the VM's host memory limit{of}{guest}"
        case "host":
            return (
                "out of memory: the host's OOM killer ended QEMU (the host or a parent cgroup "
                "ran out of memory, not the VM's own limit)"
            )
    return None


def _cgroup_of(run_dir: Path) -> VMCgroup:
    """The cgroup of the VM whose run dir this is (a VM's id names both)."""
    return VMCgroup(f"vm-{run_dir.name}")


def death_reason_of(run_dir: Path, memory_mib: int | None = None) -> str | None:
    """What is known of why the VM of a run dir that is not running any more ended, read
    before remove_run_dir (which removes its cgroup)."""
    return oom_death_reason(_cgroup_of(run_dir), memory_mib)


def usage_of(run_dir: Path) -> tuple[int, int]:
    """The CPU ms and peak memory bytes its cgroup counted for the VM of a run dir that is
    not running any more, read before remove_run_dir (which removes the cgroup)."""
    cgroup = _cgroup_of(run_dir)
    return cgroup.cpu_ns() // 1_000_000, MemoryPeak(cgroup, run_dir).sample()


def started_unix_of(run_dir: Path) -> float | None:
    """When the VM of a run dir was started (unix time), or None if nothing says."""
    try:
        started = float(json.loads((run_dir / "vm.json").read_text())["started_unix"])
        if math.isfinite(started):
            return started
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # killed before vm.json was written: its labels are written as the dir is made
        return (run_dir / LABELS_FILE).stat().st_mtime
    except OSError:
        return None


def last_written(run_dir: Path) -> float | None:
    """When anything in a run dir was last written (its console, memory peak, state): for
    a VM that died while no host process watched, about when it died. None if empty."""
    times = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(run_dir):
            with contextlib.suppress(OSError):
                times.append(entry.stat(follow_symlinks=False).st_mtime)
    return max(times, default=None)


def console_of(run_dir: Path) -> str:
    """The tail of the console of the VM of a run dir, read before remove_run_dir."""
    return read_tail(run_dir / CONSOLE_LOG)


def remove_run_dir(run_dir: Path) -> None:
    """Remove the run dir and cgroup of a VM that is not running (any more)."""
    _cgroup_of(run_dir).remove()
    shutil.rmtree(run_dir, ignore_errors=True)


def kill_orphan(run_dir: Path, timeout: float = 5.0) -> None:
    """SIGKILL the VM of a run dir that cannot be adopted and wait for it to go. Through its
    cgroup too, and even with no pid on record: a host that died between QEMU's start and
    vm.json being written leaves a QEMU only the cgroup names."""
    pid = running_pid(run_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _cgroup_of(run_dir).kill_all()
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


# The VMSpec's labels, written into its run dir as it is made (run_dir_labels reads them).
LABELS_FILE = "labels.json"


def run_dir_labels(run_dir: Path) -> dict[str, str]:
    """The labels the VM of a run dir was started with ({} if none or unreadable)."""
    try:
        labels = json.loads((run_dir / LABELS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(labels, dict):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
