"""A process the kernel's OOM killer ends is told apart by which limit ran out: the VM's
own ("limit": raise the sandbox's memory) or one above it ("host": the host or a parent
group ran out). Real cgroups, a real allocating process; the end-to-end case with QEMU is
tests/vmm/test_faults.py::test_qemu_killed_at_its_memory_limit_is_reported_as_out_of_memory."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from isorun.vmm import cgroup
from isorun.vmm.rundir import oom_death_reason

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="VM cgroups are made as root")

ALLOCATE = "b = b'x' * (192 << 20)"  # touched, so charged to the group


def _allocate_in(group: cgroup.VMCgroup) -> int:
    """Run a process that allocates 192 MiB in `group`; its exit status."""
    # it allocates only once told to, after its move into the group
    wait_for_go = "import sys; sys.stdin.read(1)"
    child = subprocess.Popen(
        [sys.executable, "-c", f"{wait_for_go}; {ALLOCATE}"], stdin=subprocess.PIPE
    )
    assert child.stdin is not None
    try:
        for procs in group.procs_files():
            procs.write_text(str(child.pid))
        child.stdin.write(b"go")
        child.stdin.close()
        return child.wait(30)
    finally:
        child.kill()
        child.wait()


def _oom_killed_in(group: cgroup.VMCgroup) -> tuple[str | None, str]:
    """Have a process of `group` OOM-killed; what the group says of it, and the VM's death
    reason (a 256 MiB guest)."""
    assert _allocate_in(group) == -9
    return group.oom_kill(), oom_death_reason(group, 256) or ""


def _memory_dir(group: cgroup.VMCgroup) -> Path:
    dirs = [f.parent for f in group.procs_files()]
    return next(
        d for d in dirs if (d / "memory.max").exists() or (d / "memory.limit_in_bytes").exists()
    )


def _set_limit(d: Path, limit: int) -> None:
    (d / ("memory.max" if (d / "memory.max").exists() else "memory.limit_in_bytes")).write_text(
        str(limit)
    )


def test_a_kill_at_the_groups_own_limit_is_the_vms_limit() -> None:
    group = cgroup.VMCgroup(f"vm-oomtest-{uuid.uuid4().hex[:8]}")
    group.create(64 << 20, 1)
    try:
        assert group.oom_kill() is None
        kind, reason = _oom_killed_in(group)
        assert kind == "limit"
        assert reason.endswith("host memory limit of 64 MiB for a 256 MiB guest")
    finally:
        group.remove()


def test_a_kill_at_a_parents_limit_is_not_blamed_on_the_vm() -> None:
    parent = f"oomtest-{uuid.uuid4().hex[:8]}"
    group = cgroup.VMCgroup(f"{parent}/vm-child")
    group.create(2 << 30, 1)  # the VM's own limit is far away
    parent_dir = _memory_dir(group).parent
    try:
        _set_limit(parent_dir, 64 << 20)
        kind, reason = _oom_killed_in(group)
        assert kind == "host" and "not the VM's own limit" in reason
    finally:
        group.remove()
        for d in {f.parent.parent for f in group.procs_files()}:
            d.rmdir()
