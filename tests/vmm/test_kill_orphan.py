"""A run dir that cannot be adopted has its VM killed through its cgroup, even when the host
died before it recorded QEMU's pid (vm.json): that QEMU must not outlive the cleanup."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from isorun.vmm import cgroup, kill_orphan

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="VM cgroups are made as root")


def test_a_vm_with_no_pid_on_record_is_killed_through_its_cgroup(tmp_path: Path) -> None:
    run_dir = tmp_path / uuid.uuid4().hex[:12]
    run_dir.mkdir()  # no vm.json: the host died right after spawning QEMU
    group = cgroup.VMCgroup(f"vm-{run_dir.name}")
    group.create(64 << 20, 1.0)
    stand_in = subprocess.Popen(["sleep", "300"])  # the QEMU only the cgroup names
    try:
        for procs in group.procs_files():
            procs.write_text(str(stand_in.pid))
        kill_orphan(run_dir)
        assert stand_in.wait(5) == -9
    finally:
        stand_in.kill()
        stand_in.wait()
        group.remove()
