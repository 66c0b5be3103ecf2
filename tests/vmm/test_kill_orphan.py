"""A run dir that cannot be adopted has its VM killed through its cgroup, even when the host
died before it recorded QEMU's pid (vm.json): that QEMU must not outlive the cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from isorun.vmm import cgroup, kill_orphan, running_pid
from isorun.vmm.process import argv_of

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


def test_a_pid_reused_by_the_vm_of_a_longer_named_run_dir_is_not_killed(tmp_path: Path) -> None:
    """A dead VM's vm.json names a pid now used by another VM, whose run dir's name merely
    starts with the dead one's (vms/ab, vms/abc): its QEMU's command line names files in
    vms/abc/, which do not make it the VM of vms/ab."""
    dead, other = tmp_path / "ab", tmp_path / "abc"
    dead.mkdir()
    other.mkdir()
    # The other VM's QEMU, naming its pidfile as QEMU's command line does.
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "-pidfile", f"{other}/qemu.pid"],
        start_new_session=True,  # its own group: kill_orphan kills the group
    )
    try:
        for d in (dead, other):
            (d / "vm.json").write_text(json.dumps({"pid": stand_in.pid}))
        deadline = time.monotonic() + 10
        while running_pid(other) != stand_in.pid and time.monotonic() < deadline:
            time.sleep(0.05)  # until the stand-in runs, its command line in place
        assert running_pid(other) == stand_in.pid, argv_of(stand_in.pid)
        assert running_pid(dead) is None
        kill_orphan(dead)
        time.sleep(0.2)  # a SIGKILL is not seen at once
        assert stand_in.poll() is None, "the other VM's QEMU was killed"
        assert running_pid(other) == stand_in.pid, argv_of(stand_in.pid)
    finally:
        stand_in.kill()
        stand_in.wait()
