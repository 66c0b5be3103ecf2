"""Empty VM cgroups left by host processes killed before they cleaned up are swept (they
were never removed: 25 here from killed test runs); a group with a process is kept."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from isorun.vmm import cgroup


@pytest.mark.skipif(os.geteuid() != 0, reason="VM cgroups are made as root")
def test_empty_vm_cgroups_are_swept_and_used_ones_kept() -> None:
    empty = cgroup.VMCgroup(f"vm-sweep-{uuid.uuid4().hex[:8]}")
    used = cgroup.VMCgroup(f"vm-sweep-{uuid.uuid4().hex[:8]}")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for group in (empty, used):
            group.create(64 << 20, 1)
        for procs in used.procs_files():
            procs.write_text(str(sleeper.pid))
        # young ones are left (a VM's group is empty for a moment before QEMU enters it)
        cgroup.sweep_empty(min_age_s=3600, prefix="vm-sweep-")
        assert all(f.parent.exists() for f in empty.procs_files())
        # (only this test's groups: another VM's may be in its first moment right now)
        assert cgroup.sweep_empty(min_age_s=0, prefix="vm-sweep-") >= 1
        assert not any(f.parent.exists() for f in empty.procs_files())
        assert all(f.parent.exists() for f in used.procs_files())
    finally:
        sleeper.kill()
        sleeper.wait()
        used.remove()
        empty.remove()
