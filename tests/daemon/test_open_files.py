"""The daemon raises its own open-files limit: with the common default of 1024, a few
hundred sandboxes (sockets, pidfds, streams each) would exhaust it."""

from __future__ import annotations

import resource
from pathlib import Path

from daemonhelpers import Daemon

from isorun.daemon.main import OPEN_FILES


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/PID/limits")


def test_the_daemon_raises_a_low_open_files_limit_it_inherits(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    daemon = Daemon(tmp_path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the daemon
    try:
        daemon.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert daemon.proc is not None
        want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
        assert want > 1024  # else this host cannot show it
        assert _soft_open_files(daemon.proc.pid) == want
    finally:
        daemon.stop()
