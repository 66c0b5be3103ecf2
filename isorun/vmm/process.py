"""The QEMU process of one VM, watched through a pidfd.

A pidfd works the same for a child we spawned and for a QEMU an earlier daemon spawned
(it runs in its own session and outlives the daemon), so supervision has one code path and
closing the host side never kills the VM (asyncio's subprocess transports would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

# How often a VM process is looked at when no pidfd can be opened for it.
POLL_S = 0.1


class VMProcess:
    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._child = child
        self.returncode: int | None = None
        self.exited = False

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        log: Path,
        pass_fds: Sequence[int],
        cgroup_procs: Sequence[Path] = (),
    ) -> VMProcess:
        """Start argv in its own session, inside the cgroups whose `cgroup.procs` files are
        given, before it executes: every thread and child QEMU makes is counted and limited."""
        with open(log, "wb") as out:
            child = subprocess.Popen(
                _in_cgroups(list(argv), cgroup_procs),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=list(pass_fds),
                start_new_session=True,  # its own process group: killpg reaches the whole jail
                env=qemu_environment(),
            )
        return cls(child.pid, child)

    async def wait(self) -> int | None:
        """Wait for exit; the exit status when it was our child (negative: signal)."""
        if self.exited:
            return self.returncode
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = -1
        except OSError:
            # No fd to spare (the host process at its limit): look instead, opening nothing.
            # The VM must not count as gone while it runs, nor stay "alive" once it is not.
            fd = -1
            while not self._exited_now():
                await asyncio.sleep(POLL_S)
        if fd >= 0:
            loop.add_reader(fd, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        if self._child is not None:
            self.returncode = self._child.wait()
        self.exited = True
        return self.returncode

    def _exited_now(self) -> bool:
        """Whether it has exited, asked without an fd: our child is reaped on the spot (a
        zombie counts), another process's is reaped by its own parent."""
        if self._child is not None:
            return self._child.poll() is not None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def gone(self) -> bool:
        """Whether it has exited, without waiting (a zombie child counts: it has)."""
        return self.exited or not alive(self.pid)

    def kill(self) -> None:
        if not self.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


# A shell enters the cgroups and then becomes the VM process (same pid, via exec). Unlike a
# preexec_fn this is safe in a process that has threads (the daemon does).
_ENTER = (
    'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; '
    'shift; exec "$@"'
)


def qemu_environment() -> dict[str, str]:
    """What QEMU gets of the host process's environment: a PATH to find its binaries by
    name, and nothing else. The daemon's environment holds the operator's secrets (a proxy's
    password, cloud keys), and a guest that breaks into QEMU could read them there."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}


def _in_cgroups(argv: list[str], procs_files: Sequence[Path]) -> list[str]:
    if not procs_files:
        return argv
    return ["/bin/sh", "-c", _ENTER, "isorun-enter-cgroup", *map(str, procs_files), "--", *argv]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        # not gone, merely unreadable now (no fd to spare): ask without one, zombies alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def argv_of(pid: int) -> list[str]:
    """The command line of `pid` ([] when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").split("\0")
