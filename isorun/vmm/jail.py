"""Defense in depth around QEMU: its own namespaces, an unprivileged user, an empty chroot.

QEMU opens every file and socket it needs at start-up (we hand it socket fds), then
`-run-with user=…,chroot=…` drops root and enters an empty directory; `-sandbox` adds
seccomp. `unshare` gives it private mount, UTS, IPC, PID and network namespaces (an empty
network namespace: no NIC, no route, until the network layer gives it one).
"""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

from isorun.errors import ConfigError
from isorun.vmm.artifacts import tool

QEMU_USER = "isorun-qemu"


def qemu_user() -> str:
    """The unprivileged account QEMU drops to; created on first use."""
    try:
        pwd.getpwnam(QEMU_USER)
        return QEMU_USER
    except KeyError:
        pass
    useradd = tool("useradd", "passwd")
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", QEMU_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode not in (0, 9):  # 9: created concurrently
        raise ConfigError(f"cannot create the {QEMU_USER} user: {result.stderr.strip()}")
    return QEMU_USER


def empty_root(run_dir: Path) -> Path:
    root = run_dir / "jail"
    root.mkdir(mode=0o555, exist_ok=True)
    return root


def namespaced(argv: list[str]) -> list[str]:
    unshare = tool("unshare", "util-linux")
    return [
        unshare,
        "--mount",
        "--uts",
        "--ipc",
        "--net",
        "--pid",
        "--fork",
        "--kill-child=SIGKILL",
        "--",
        *argv,
    ]
