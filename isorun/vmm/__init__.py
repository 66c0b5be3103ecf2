"""The VMM driver: QEMU microVMs with a guest agent, jailed, limited and supervised."""

from isorun.vmm.accel import AccelChoice, detect
from isorun.vmm.machine import MicroVM, VMUsage
from isorun.vmm.rundir import (
    console_of,
    death_reason_of,
    kill_orphan,
    last_written,
    remove_run_dir,
    run_dir_labels,
    running_pid,
    started_unix_of,
    usage_of,
)
from isorun.vmm.spec import VMSpec

__all__ = [
    "AccelChoice",
    "MicroVM",
    "VMSpec",
    "VMUsage",
    "console_of",
    "death_reason_of",
    "detect",
    "kill_orphan",
    "last_written",
    "remove_run_dir",
    "run_dir_labels",
    "running_pid",
    "started_unix_of",
    "usage_of",
]
