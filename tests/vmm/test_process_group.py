"""The processes the agent starts are born into a cgroup of their own (isorun.procs) whose
pids.max leaves the agent and the kernel room: a fork or thread bomb, even as root, fails
at that limit instead of taking every task the kernel allows (the agent, PID 1, then could
not start an OS thread and died, panicking the kernel), and the agent answers throughout."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from vmhelpers import vm_spec

from isorun.vmm import MicroVM

GROUP = "/sys/fs/cgroup/isorun.procs"


async def _int_file(vm: MicroVM, path: str) -> int:
    return int((await vm.agent.read_bytes(path)).decode().split()[0])


async def _tasks(vm: MicroVM) -> int:
    """Every task in the guest, the kernel's threads too (what threads-max counts)."""
    loadavg = (await vm.agent.read_bytes("/proc/loadavg")).decode().split()
    return int(loadavg[3].split("/")[1])


@pytest.mark.asyncio
async def test_commands_are_born_into_a_group_that_leaves_the_agent_room(
    vm: MicroVM,
) -> None:
    r = await vm.agent.exec("cat /proc/self/cgroup")
    assert r.stdout == b"0::/isorun.procs\n", r
    proc_id, pid = await vm.agent.spawn("sleep 30")
    assert (await vm.agent.read_bytes(f"/proc/{pid}/cgroup")) == b"0::/isorun.procs\n"
    await vm.agent.kill(proc_id)
    r = await vm.agent.exec("cat /proc/self/cgroup", pty=(24, 80))
    assert b"0::/isorun.procs" in r.stdout, r
    limit = await _int_file(vm, f"{GROUP}/pids.max")
    threads_max = await _int_file(vm, "/proc/sys/kernel/threads-max")
    assert limit + 256 <= threads_max - await _tasks(vm) + 64, (limit, threads_max)
    # cpu too: however many processes a command starts, they weigh as one against the agent
    controllers = (await vm.agent.read_bytes(f"{GROUP}/cgroup.controllers")).decode().split()
    assert {"pids", "cpu"} <= set(controllers), controllers


@pytest.mark.asyncio
async def test_a_big_guest_gets_the_group_and_the_pids_for_it(busybox_rootfs: Path) -> None:
    """The guest kernel starts pid_max at 4096, which capped every sandbox at that many
    tasks; in a 6 GiB guest the limit from threads-max (~47,000) was more than pids.max
    takes, and the group was not made at all."""
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, memory_mib=6144))
    try:
        r = await vm.agent.exec("cat /proc/self/cgroup")
        assert r.stdout == b"0::/isorun.procs\n", r
        pid_max = await _int_file(vm, "/proc/sys/kernel/pid_max")
        assert pid_max >= 32768
        limit = await _int_file(vm, f"{GROUP}/pids.max")
        assert 16384 < limit <= pid_max - 256
    finally:
        await vm.kill()


@pytest.mark.asyncio
async def test_a_frozen_group_does_not_wedge_the_agent(vm: MicroVM) -> None:
    """A process born into a frozen group is frozen before its exec, and the agent's fork
    waits for that exec holding the lock every start, kill and the reaper need."""
    out_of_it = "echo $$ > /sys/fs/cgroup/cgroup.procs && "
    r = await vm.agent.exec(out_of_it + f"echo 1 > {GROUP}/cgroup.freeze")
    assert r.exit_code == 0, r
    r = await asyncio.wait_for(vm.agent.exec("echo started"), 30)
    assert r.stdout == b"started\n", r


@pytest.mark.asyncio
async def test_a_group_guest_root_removed_or_spoilt_is_made_again_or_done_without(
    vm: MicroVM,
) -> None:
    out_of_it = "echo $$ > /sys/fs/cgroup/cgroup.procs && "
    r = await vm.agent.exec(out_of_it + f"rmdir {GROUP}")
    assert r.exit_code == 0, r
    r = await vm.agent.exec("cat /proc/self/cgroup")
    assert r.stdout == b"0::/isorun.procs\n", r  # made again
    assert await _int_file(vm, f"{GROUP}/pids.max") > 0
    # a domain controller on for its children: no process may join it (EBUSY); one starts
    # anyway, in the agent's group
    on = "echo +memory > /sys/fs/cgroup/cgroup.subtree_control && "
    r = await vm.agent.exec(out_of_it + on + f"echo +memory > {GROUP}/cgroup.subtree_control")
    assert r.exit_code == 0, r
    r = await vm.agent.exec("cat /proc/self/cgroup")
    assert r.exit_code == 0 and r.stdout == b"0::/\n", r
    # and the console says so, once
    await vm.agent.exec("true")
    deadline = time.monotonic() + 10
    while "isorun.procs refuses new processes" not in vm.console.tail(8192):
        assert time.monotonic() < deadline, vm.console.tail(2048)
        await asyncio.sleep(0.2)
    assert vm.console.tail(8192).count("isorun.procs refuses new processes") == 1


# Threads until the kernel refuses, then more every millisecond: each costs a task and
# little memory, so unlike processes they reach the kernel's threads-max before memory
# runs out (a fork bomb of busybox shells stopped at memory in a 128 MiB guest).
THREAD_BOMB_C = r"""
#include <pthread.h>
#include <unistd.h>
static void *park(void *a) { (void)a; for (;;) pause(); return 0; }
int main(void) {
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	for (;;) {
		pthread_t t;
		if (pthread_create(&t, &attr, park, 0) != 0)
			usleep(1000);
	}
}
"""


@pytest.fixture(scope="module")
def thread_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    work = tmp_path_factory.mktemp("thread-bomb")
    (work / "bomb.c").write_text(THREAD_BOMB_C)
    build = ["cc", "-static", "-O2", "-pthread", "-o", str(work / "bomb"), str(work / "bomb.c")]
    subprocess.run(build, check=True)
    return (work / "bomb").read_bytes()


async def _busy_agent(vm: MicroVM) -> None:
    """Many requests at once that need no fork: each may need an OS thread of its own
    while another blocks in a system call."""

    async def one(k: int) -> object:
        if k % 4 == 0:
            return await vm.agent.stat("/etc/passwd")
        if k % 4 == 1:
            return await vm.agent.list("/proc", depth=1)
        if k % 4 == 2:
            return await vm.agent.read_bytes("/proc/meminfo")
        return await vm.agent.write_file(f"/tmp/w{k}", b"x" * 65536)

    await asyncio.gather(*(one(k) for k in range(40)))


@pytest.mark.asyncio
@pytest.mark.parametrize("memory_mib", [128, 1024])
async def test_a_thread_bomb_as_root_stops_at_the_group_limit_and_the_agent_answers(
    busybox_rootfs: Path, thread_bomb: bytes, memory_mib: int
) -> None:
    """Before the group, the agent's next requests after such a bomb ended the sandbox: the
    Go runtime could not make a thread ("failed to create new OS thread"), PID 1 died. In
    1 GiB the kernel's threads-max (~7900) passes the guest kernel's first pid_max (4096):
    a limit from threads-max alone let the bomb take every pid, with the same end."""
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, memory_mib=memory_mib))
    try:
        threads_max = await _int_file(vm, "/proc/sys/kernel/threads-max")
        await vm.agent.write_file("/tmp/bomb", thread_bomb, mode=0o755)
        bomb, _ = await vm.agent.spawn(argv=["/tmp/bomb"])
        # until it grows no more (its threads wait a millisecond after each refusal)
        seen: list[int] = []
        deadline = time.monotonic() + 240
        while len(seen) < 4 or seen[-1] > seen[-4] or seen[-1] < 400:
            assert time.monotonic() < deadline, f"the bomb's tasks: {seen[-8:]}"
            seen.append(await _tasks(vm))
            await asyncio.sleep(0.5)
        # Full: the agent answers, and the guest's tasks leave room for its threads.
        for _ in range(3):
            await _busy_agent(vm)
        assert (await vm.agent.health())["ok"] is True
        pid_max = await _int_file(vm, "/proc/sys/kernel/pid_max")
        assert min(threads_max, pid_max) - await _tasks(vm) >= 128
        # A command that cannot start says why.
        r = await vm.agent.exec("true")
        assert r.exit_code == 126 and b"processes are at their limit" in r.stderr, r
        # Ending the command ends its threads.
        await vm.agent.kill(bomb, grace=0)
        assert (await vm.agent.exec("true")).exit_code == 0
        assert await _int_file(vm, f"{GROUP}/pids.current") <= 2
        assert vm.alive and vm.death_reason is None
    finally:
        await vm.kill()
