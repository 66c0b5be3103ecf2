"""Per-VM cgroup: memory and CPU limits for the QEMU process, and host-side metering.

Works on cgroup v2 (unified) and v1 (separate memory/cpu/cpuacct/pids hierarchies; these
machines have v1). QEMU is placed in the group before it executes, so every thread and
child counts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "isorun"
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


def _is_v2(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class VMCgroup:
    """Create with `create()`, put a pid in with `procs_files()`, remove with `remove()`."""

    def __init__(self, name: str, root: Path = ROOT) -> None:
        self.name = name
        self.root = root
        self.v2 = _is_v2(root)

    def _dirs(self) -> dict[str, Path]:
        if self.v2:
            return {"unified": self.root / GROUP / self.name}
        return {
            c: self.root / c / GROUP / self.name for c in V1_CONTROLLERS if (self.root / c).is_dir()
        }

    def create(self, memory_bytes: int, cpus: float, max_pids: int = 4096) -> None:
        """Limit the group to `memory_bytes` and `cpus` CPUs' worth of time per period."""
        if self.v2:
            parent = self.root / GROUP
            parent.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                _write(self.root / "cgroup.subtree_control", "+memory +cpu +pids")
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", "+memory +cpu +pids")
        for d in self._dirs().values():
            d.mkdir(parents=True, exist_ok=True)
        dirs = self._dirs()
        period = 100_000
        quota = max(1000, round(cpus * period))
        if self.v2:
            d = dirs["unified"]
            _write(d / "memory.max", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "cpu.max", f"{quota} {period}")
            _write(d / "pids.max", str(max_pids))
            return
        if "memory" in dirs:
            _write(dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
        if "cpu" in dirs:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(period))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        if "pids" in dirs:
            _write(dirs["pids"] / "pids.max", str(max_pids))

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self._dirs().values()]

    def cpu_ns(self) -> int:
        """CPU time the group used so far (0 when unreadable)."""
        dirs = self._dirs()
        with contextlib.suppress(OSError, ValueError):
            if self.v2:
                for line in (dirs["unified"] / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) * 1000
            elif "cpuacct" in dirs:
                return int((dirs["cpuacct"] / "cpuacct.usage").read_text())
        return 0

    def resident_bytes(self) -> int:
        """The group's memory in use now without the page cache it is charged for (shmem
        is kept: it is memory, not a copy of a file); 0 when unreadable. mempeak.py says why
        this, and not the group's own peak."""
        d = self._memory_dir()
        if d is None:
            return 0
        stat = _counters(d / "memory.stat")
        used = _read_int(d / ("memory.current" if self.v2 else "memory.usage_in_bytes")) or 0
        cache = stat.get("file" if self.v2 else "cache", 0) - stat.get("shmem", 0)
        return max(0, used - max(0, cache))

    def _memory_dir(self) -> Path | None:
        dirs = self._dirs()
        return dirs["unified"] if self.v2 else dirs.get("memory")

    def oom_kill(self) -> str | None:
        """Whether the kernel's OOM killer ended a process of the group: "limit" when the
        group's own memory limit ran out, "host" when the memory ran out elsewhere (the
        host, a parent group), None when it did not. QEMU killed either way exits like any
        SIGKILL. The victim's group counts the kill whichever limit ran out; v2 counts the
        group's own limit running out apart (`oom`), v1 only that usage ever hit the limit
        (`memory.failcnt`)."""
        d = self._memory_dir()
        if d is None:
            return None
        if self.v2:
            events = _counters(d / "memory.events")
            kills, own = events.get("oom_kill", 0), events.get("oom", 0)
        else:
            kills = _counters(d / "memory.oom_control").get("oom_kill", 0)  # Linux >= 4.13
            own = _read_int(d / "memory.failcnt") or 0
        if kills <= 0:
            return None
        return "limit" if own > 0 else "host"

    def memory_limit(self) -> int | None:
        """The group's memory limit in bytes as it is now (None: none, or unreadable)."""
        d = self._memory_dir()
        if d is None:
            return None
        limit = _read_int(d / ("memory.max" if self.v2 else "memory.limit_in_bytes"))
        return limit if limit is not None and limit < 1 << 60 else None  # v1: huge = none

    def kill_all(self) -> None:
        """SIGKILL every process in the group. QEMU's process group is not enough: a QEMU the
        guest took over may call setsid (its seccomp filter allows it while it drops root),
        and the jail's pid namespace then outlives the kill; it cannot leave the cgroup."""
        for d in self._dirs().values():
            kill_file = d / "cgroup.kill"  # v2, Linux >= 5.14: the kernel does it at once
            if self.v2 and kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
                    continue
            for _ in range(3):  # a process forked meanwhile is caught by the next round
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir each group; retries briefly because the kernel frees dying tasks lazily."""
        deadline = time.monotonic() + timeout
        for d in self._dirs().values():
            while d.exists():
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)


def _counters(path: Path) -> dict[str, int]:
    """The `name value` lines of a cgroup file ({} when unreadable)."""
    try:
        lines = path.read_text().splitlines()
        return {k: int(v) for k, _, v in (line.partition(" ") for line in lines) if v}
    except (OSError, ValueError):
        return {}


def _read_int(path: Path) -> int | None:
    """A cgroup file holding one number (None when unreadable, or v2's "max")."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def sweep_empty(min_age_s: float = 60.0, prefix: str = "vm-", root: Path = ROOT) -> int:
    """Remove VM cgroups that hold no process and are older than min_age_s; how many went.

    A VM's cgroup holds its QEMU from a moment after it is made until the VM is cleaned up,
    so an empty one left over is a VM whose host process was killed before it could clean up
    (its run dir may be gone, in a test's temporary state dir, say): nothing else removes it.
    Groups of every state dir share the one hierarchy; an empty one is nobody's.
    """
    parents = [root / GROUP] if _is_v2(root) else [root / c / GROUP for c in V1_CONTROLLERS]
    removed: set[str] = set()
    now = time.time()
    for parent in parents:
        with contextlib.suppress(OSError):
            for d in parent.glob(f"{prefix}*"):
                try:
                    if now - d.stat().st_mtime < min_age_s:
                        continue
                    if (d / "cgroup.procs").read_text().strip():
                        continue
                    os.rmdir(d)
                    removed.add(d.name)
                except OSError:
                    continue  # in use meanwhile, or already gone
    return len(removed)
