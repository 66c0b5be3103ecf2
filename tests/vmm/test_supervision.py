"""A VM whose supervision cannot get a pidfd (the host process out of file descriptors) is
still seen to run while it runs, seen to die when it dies, and cleaned up by kill().

The VM process here is a stand-in (`sleep`): what is under test is the host's supervision,
which treats QEMU as any process in its own session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

from isorun.vmm import accel as accel_mod
from isorun.vmm.machine import MicroVM
from isorun.vmm.process import VMProcess
from isorun.vmm.spec import VMSpec


@contextlib.contextmanager
def _no_fd_to_spare() -> Iterator[None]:
    """Every free file descriptor taken (at a lowered soft limit, so it is quick)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    held: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _stand_in_vm(run_dir: Path) -> MicroVM:
    run_dir.mkdir()
    vm = MicroVM(run_dir.name, VMSpec(), accel_mod.AccelChoice("tcg", "test"), run_dir=run_dir)
    vm._proc = VMProcess.spawn(["sleep", "300"], run_dir / "qemu.stderr", [])
    return vm


async def _supervised_without_fds(vm: MicroVM) -> None:
    with _no_fd_to_spare():
        vm._supervisor = asyncio.create_task(vm._supervise())
        await asyncio.sleep(0.3)  # its pidfd_open (and first looks) run out of fds


async def test_a_vm_supervised_without_a_pidfd_lives_until_it_dies(tmp_path: Path) -> None:
    vm = _stand_in_vm(tmp_path / "vm-nofds1")
    await _supervised_without_fds(vm)
    assert vm.alive  # not taken for dead because no fd could be opened
    assert vm.pid is not None
    os.killpg(vm.pid, signal.SIGKILL)  # ended from outside, as the OOM killer would
    assert await asyncio.wait_for(vm.wait(), 5) == f"killed by signal {signal.SIGKILL}"
    assert not vm.alive
    await vm.kill()
    assert not vm.run_dir.exists()


async def test_kill_cleans_up_a_vm_whose_supervision_failed(tmp_path: Path) -> None:
    vm = _stand_in_vm(tmp_path / "vm-nofds2")

    async def explaining_fails(code: int | None) -> None:
        raise OSError(24, "Too many open files")

    vm._explain_exit = explaining_fails  # type: ignore[method-assign]
    await _supervised_without_fds(vm)
    for _ in range(2):  # a second kill does not raise what the supervision failed on
        await asyncio.wait_for(vm.kill(), 10)
    assert vm._proc is not None and vm._proc.gone()
    assert not vm.alive and await vm.wait() == "unknown"
    assert not vm.run_dir.exists()
