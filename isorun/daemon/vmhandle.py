"""Re-adopting a running QEMU after a daemon restart, and letting go of one on a clean stop.

QEMU runs in its own session, so it outlives the daemon. A restarted daemon reads the VM's
`vm.json` (pid) in its run dir, checks the pid is still that VM (its command line names
the run dir), and reconnects QMP, the console and the agent (the agent accepts a new
`hello` after its host peer went away). Exit is noticed through a pidfd, since the process
is no longer our child.

This belongs in `isorun.vmm` (a `MicroVM.adopt(run_dir)` and `MicroVM.detach()`); it lives
here, on MicroVM's public pieces plus a few of its attributes, until it moves there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

from isorun.agent import AgentClient, AgentConnection
from isorun.errors import ChannelClosedError, VMError
from isorun.vmm import MicroVM, VMSpec, VMUsage
from isorun.vmm.accel import AccelChoice


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode("utf-8", "replace")
        )
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def vm_pid_if_alive(run_dir: Path) -> int | None:
    """The QEMU (or its unshare wrapper) pid of `run_dir`, if that process still runs."""
    try:
        state = json.loads((run_dir / "vm.json").read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid <= 1 or not _alive(pid):
        return None
    if str(run_dir) not in _cmdline(pid):  # pid reused by something else
        return None
    return pid


def kill_orphan(run_dir: Path) -> None:
    """SIGKILL the VM process group of a run dir we cannot adopt."""
    pid = vm_pid_if_alive(run_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def detach(vm: MicroVM) -> None:
    """Let the daemon exit without asyncio killing QEMU (it kills running children of
    subprocess transports when they are closed)."""
    proc = getattr(vm, "_proc", None)
    transport = getattr(proc, "_transport", None)
    popen = getattr(transport, "_proc", None)
    if popen is not None and popen.returncode is None:
        popen.returncode = 0  # the transport then believes it already exited


class AdoptedVM(MicroVM):
    """A MicroVM whose QEMU was started by an earlier daemon process."""

    _pid: int

    @classmethod
    async def adopt(cls, run_dir: Path, started_wall: float, timeout: float = 10.0) -> AdoptedVM:
        state = json.loads((run_dir / "vm.json").read_text())
        pid = vm_pid_if_alive(run_dir)
        if pid is None:
            raise VMError(f"VM {state.get('id')} is no longer running", "gone")
        spec = VMSpec(
            rootfs=Path(state["rootfs"]) if state.get("rootfs") else None,
            vcpus=int(state["vcpus"]),
            memory_mib=int(state["memory_mib"]),
        )
        vm = cls(str(state["id"]), spec, AccelChoice(name=str(state["accel"]), reason="adopted"))
        vm.run_dir = run_dir
        vm._pid = pid
        vm.started_at = time.monotonic() - max(0.0, time.time() - started_wall)
        with contextlib.suppress(OSError):
            console_r, console_w = await asyncio.open_unix_connection(str(run_dir / "console.sock"))
            vm.console.start(console_r, console_w)
        await vm._qmp.connect(run_dir / "qmp.sock")
        conn = await AgentConnection.open_unix(str(run_dir / "agent.sock"), timeout=timeout)
        conn.on_close = vm._on_agent_closed
        vm.agent = AgentClient(conn)
        vm._supervisor = asyncio.create_task(vm._watch_pid(), name=f"vm:{vm.id}")
        return vm

    async def _watch_pid(self) -> None:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        try:
            fd = os.pidfd_open(self._pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            loop.add_reader(fd, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        self.death_reason = (
            "shutdown"
            if self._shutdown_requested
            else ("poweroff" if self.console.halted else "stopped")
        )
        self._final_usage = self._usage_now()
        self._exited.set()
        conn = getattr(self, "agent", None)
        if conn is not None:
            conn.conn._fail(
                ChannelClosedError(f"sandbox VM {self.id} is dead: {self.death_reason}")
            )

    @property
    def alive(self) -> bool:
        return not self._exited.is_set()

    @property
    def pid(self) -> int | None:
        return self._pid

    async def kill(self) -> VMUsage:
        if not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGKILL)
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        return await self._cleanup()
