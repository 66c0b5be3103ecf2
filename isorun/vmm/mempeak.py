"""The peak of a VM's memory, sampled each second, without the host's page cache.

The cgroup's own peak (memory.peak, memory.max_usage_in_bytes) counts the host page cache
that the VM's disk I/O brings in, which the kernel charges to QEMU: a 256 MiB sandbox that
wrote 600 MB to its disk peaked at 575 MiB. What a user means by a sandbox's memory is the
guest RAM QEMU has touched plus QEMU's own, which is the group's usage without that cache.
No kernel counter keeps a peak of it, so it is sampled once a second (usage is metered per
second), and the peak is written to the run dir whenever it grows by a MiB, so a daemon
that adopts the VM after a restart (or meters a VM that ended meanwhile) carries it on.
Guest RAM, most of it, only grows: a sample a second misses little.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from isorun.vmm.cgroup import VMCgroup

SAMPLE_S = 1.0
FILE = "mem_peak"
_PERSIST_STEP = 1 << 20
# Written at least this often too, unchanged: a VM that dies while no daemon watches it is
# billed up to its run dir's last write, and a quiet one's peak stops growing early (40 s
# of a watched idle sandbox were billed 5.6 s).
HEARTBEAT_S = 30.0


class MemoryPeak:
    def __init__(self, cgroup: VMCgroup, run_dir: Path) -> None:
        self._cgroup = cgroup
        self._file = run_dir / FILE
        self.peak = self._persisted = _read(self._file)
        self._written = time.monotonic()

    def sample(self) -> int:
        """Take a sample now; the peak so far."""
        self.peak = max(self.peak, self._cgroup.resident_bytes())
        now = time.monotonic()
        if self.peak >= self._persisted + _PERSIST_STEP or now - self._written >= HEARTBEAT_S:
            with contextlib.suppress(OSError):  # the run dir being removed: nothing to keep
                tmp = self._file.with_suffix(".tmp")
                tmp.write_text(str(self.peak))
                tmp.replace(self._file)
                self._persisted, self._written = self.peak, now
        return self.peak

    async def follow(self) -> None:
        """Sample every SAMPLE_S until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)


def _read(path: Path) -> int:
    try:
        return max(0, int(path.read_text()))
    except (OSError, ValueError):
        return 0
