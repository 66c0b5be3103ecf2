"""Faults: floods, guest death (poweroff, reboot, panic), hostile guests, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from vmhelpers import assert_vm_gone, vm_spec

from isorun.agent import AgentConnection
from isorun.errors import ChannelClosedError, ConfigError, GuestError, VMError
from isorun.vmm import MicroVM

pytestmark = pytest.mark.vm

# The flood: a block of random bytes catted FLOOD_COPIES times (~200 MB). `seq` made it
# before, but busybox seq formats each line in floating point, which under TCG took 250 s
# of the guest's CPU for 200 MB; cat takes seconds. The block's odd length keeps its
# repeats out of step with any frame or buffer size, so a reordered or lost frame changes
# the digest.
FLOOD_BLOCK = 8 * 2**20 + 4099
FLOOD_COPIES = 24


def _rss_bytes() -> int:
    """This process's current resident set (not ru_maxrss: a high-water mark that an earlier
    test may already have raised past anything this one does)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_200mb_of_stdout_arrives_in_order_with_bounded_memory(vm: MicroVM) -> None:
    block = os.urandom(FLOOD_BLOCK)
    await vm.agent.write_file("/tmp/flood", block)
    expected = hashlib.sha256()
    for _ in range(FLOOD_COPIES):
        expected.update(block)
    del block
    got = hashlib.sha256()
    total = 0
    sampled_at = 0
    rss_before = _rss_bytes()
    rss_peak = rss_before

    def on_out(b: bytes) -> None:
        nonlocal total, sampled_at, rss_peak
        total += len(b)
        got.update(b)
        if total - sampled_at >= 4 << 20:  # ~50 samples over the flood
            sampled_at = total
            rss_peak = max(rss_peak, _rss_bytes())

    copies = " ".join(["/tmp/flood"] * FLOOD_COPIES)
    r = await vm.agent.exec(f"cat {copies}", on_stdout=on_out, capture=False)
    rss_peak = max(rss_peak, _rss_bytes())
    assert r.exit_code == 0
    assert total > 190_000_000
    assert got.hexdigest() == expected.hexdigest()  # every byte, in order
    grown = rss_peak - rss_before
    assert grown < 64 * 2**20, f"host RSS grew {grown} bytes during the flood"
    status = (await vm.agent.exec("grep VmHWM /proc/1/status")).stdout.split()
    assert int(status[1]) * 1024 < 96 * 2**20  # so did the agent (peak RSS)


async def test_poweroff_from_inside_is_reported(vm: MicroVM) -> None:
    with pytest.raises(ChannelClosedError):
        await vm.agent.exec("poweroff -f")
    reason = await asyncio.wait_for(vm.wait(), 20)
    assert reason == "poweroff"
    with pytest.raises(ChannelClosedError, match="dead: poweroff"):
        await vm.agent.health()


async def test_reboot_from_inside_is_reported(vm: MicroVM) -> None:
    with pytest.raises(ChannelClosedError):
        await vm.agent.exec("reboot -f")
    assert await asyncio.wait_for(vm.wait(), 20) == "reboot"


async def test_kernel_panic_is_reported(vm: MicroVM) -> None:
    if not (await vm.agent.exec("test -w /proc/sysrq-trigger")).ok:
        pytest.fail("guest kernel lacks CONFIG_MAGIC_SYSRQ: rebuild with `make guest`")
    with pytest.raises(ChannelClosedError):
        await vm.agent.exec("echo c > /proc/sysrq-trigger")
    assert await asyncio.wait_for(vm.wait(), 20) == "panic"


async def test_a_shutdown_after_the_guest_died_keeps_the_reason_it_died(vm: MicroVM) -> None:
    # A caller whose channel just broke shuts the VM down; the panic, being recorded at that
    # moment (the console drains its last lines), stays the reason, not "shutdown".
    with pytest.raises(ChannelClosedError):
        await vm.agent.exec("echo c > /proc/sysrq-trigger")
    await vm.shutdown()
    assert await asyncio.wait_for(vm.wait(), 20) == "panic"


async def test_a_host_kill_is_not_a_panic_whatever_the_guest_printed(vm: MicroVM) -> None:
    # Any guest process may print a panic's text; the VM ended by the host's kill.
    r = await vm.agent.exec("echo 'Kernel panic - not syncing: only text' > /dev/console")
    assert r.exit_code == 0, r
    await vm.kill()
    assert vm.death_reason == "killed by signal 9"


async def test_a_cold_boot_whose_image_does_not_mount_fails_naming_it(tmp_path: Path) -> None:
    # Not a filesystem: the agent would serve its initramfs, where every command is missing.
    junk = tmp_path / "junk.ext4"
    junk.write_bytes(b"not a filesystem" * 65536)
    with pytest.raises(VMError, match=r"root filesystem .*junk.ext4 did not mount") as err:
        await MicroVM.boot(vm_spec(junk, warm_start=False))
    assert err.value.reason == "root"


async def test_one_vm_dying_leaves_another_working(busybox_rootfs: Path) -> None:
    a, b = await asyncio.gather(
        MicroVM.boot(vm_spec(busybox_rootfs)), MicroVM.boot(vm_spec(busybox_rootfs))
    )
    try:
        await a.kill()
        assert a.death_reason is not None and "signal" in a.death_reason
        r = await b.agent.exec("echo still here")
        assert r.stdout == b"still here\n"
    finally:
        await a.kill()
        await b.kill()
    assert_vm_gone(a)
    assert_vm_gone(b)


async def test_clean_shutdown_reports_usage_and_leaves_nothing(busybox_rootfs: Path) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    pid = vm.pid
    await vm.agent.exec("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    usage = await vm.shutdown()
    assert vm.death_reason == "shutdown"
    # Nothing was running, so power-off did not sit out its SIGTERM grace period.
    assert "power-off: every process ended on SIGTERM" in vm.console.tail(4000)
    assert usage.cpu_ms > 0
    assert usage.mem_peak_bytes > 16 * 2**20
    assert usage.uptime_ms > 0
    assert_vm_gone(vm)
    assert pid is not None
    # No QEMU of ours is left running.
    out = subprocess.run(["pgrep", "-f", vm.id], capture_output=True, text=True).stdout
    assert out.strip() == ""


async def test_shutdown_kills_a_process_that_ignores_sigterm(busybox_rootfs: Path) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    # Wait for the trap to be set: a SIGTERM before it would end the loop at once.
    await vm.agent.exec(
        "sh -c 'trap \"\" TERM; touch /tmp/trapped; while :; do sleep 1; done' >/dev/null 2>&1 &"
        " until [ -e /tmp/trapped ]; do :; done"
    )
    await vm.shutdown()
    assert vm.death_reason == "shutdown"
    tail = vm.console.tail(4000)
    assert "power-off: processes outlived SIGTERM" in tail, tail
    assert_vm_gone(vm)


def _signal_vm(vm: MicroVM, sig: signal.Signals) -> None:
    for procs in vm.cgroup.procs_files():
        for pid in procs.read_text().split():
            os.kill(int(pid), sig)


async def test_a_hung_guest_fails_its_requests_as_unresponsive_and_a_slow_one_does_not(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short intervals keep the test to seconds; the defaults are 5 s and 60 s.
    monkeypatch.setattr(AgentConnection, "keepalive_s", 0.2)
    monkeypatch.setattr(AgentConnection, "idle_after_s", 3.0)
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    try:
        # silent for longer than the idle limit, but the agent says it is still at work
        r = await vm.agent.exec("sleep 5; echo done")
        assert r.stdout == b"done\n"
        # the whole VM stops running: the request fails instead of waiting for ever
        run = asyncio.create_task(vm.agent.exec("sleep 60"))
        await asyncio.sleep(1)
        _signal_vm(vm, signal.SIGSTOP)
        try:
            with pytest.raises(GuestError) as err:
                await asyncio.wait_for(run, 20)
        finally:
            _signal_vm(vm, signal.SIGCONT)
        assert err.value.code == "unresponsive"
        assert (await vm.agent.exec("echo back")).stdout == b"back\n"
    finally:
        await vm.kill()
    assert_vm_gone(vm)


def _tighten_memory_limit(vm: MicroVM, headroom: int) -> int:
    """Set the VM's host memory limit to what its cgroup uses now plus `headroom`; the
    limit in effect (the kernel rounds it)."""
    for procs in vm.cgroup.procs_files():
        d = procs.parent
        for limit, usage in (
            ("memory.max", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ):
            if (d / limit).exists():
                (d / limit).write_text(str(int((d / usage).read_text()) + headroom))
                return int((d / limit).read_text())
    raise AssertionError("the VM has no memory cgroup")


async def test_qemu_killed_at_its_memory_limit_is_reported_as_out_of_memory(
    busybox_rootfs: Path,
) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    try:
        # QEMU has touched only part of the guest's RAM; the guest now fills RAM it never
        # used, QEMU faults those pages in and crosses the (tightened) limit.
        limit = _tighten_memory_limit(vm, 32 << 20)
        with pytest.raises(ChannelClosedError):
            await vm.agent.exec(
                "mkdir -p /m && mount -t tmpfs -o size=160m fill /m"
                " && head -c 150000000 /dev/zero >/m/f"
            )
        reason = await asyncio.wait_for(vm.wait(), 60)
        assert reason == (
            f"out of memory: QEMU was killed at the VM's host memory limit of {limit >> 20} MiB "
            "for a 256 MiB guest"
        )
    finally:
        await vm.kill()
    assert_vm_gone(vm)


async def test_a_boot_failing_right_after_qemu_started_leaves_no_zombie(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vm.json cannot be written (a full state disk) after QEMU was spawned, before its
    # supervision started: the boot's cleanup must reap QEMU, not leave it a zombie.
    spawned: list[MicroVM] = []

    def disk_full(self: MicroVM) -> None:
        spawned.append(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MicroVM, "_write_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        await MicroVM.boot(vm_spec(busybox_rootfs))
    (vm,) = spawned
    assert vm.pid is not None
    assert not Path(f"/proc/{vm.pid}").exists(), "QEMU left unreaped (a zombie)"
    assert_vm_gone(vm)


async def test_a_vms_run_dir_is_readable_by_root_only(vm: MicroVM) -> None:
    # Its scratch disk holds what the sandbox wrote (secrets a user put there), its console
    # log what it printed: another local user of the host must not read them.
    await vm.agent.exec("echo secret > /root/s && sync")
    assert vm.run_dir.stat().st_mode & 0o777 == 0o700
    assert (vm.run_dir / "scratch.ext4").exists()


async def test_qemu_runs_jailed(vm: MicroVM) -> None:
    assert vm.pid is not None
    children = Path(f"/proc/{vm.pid}/task/{vm.pid}/children").read_text().split()
    qemu_pid = int(children[0])
    status = Path(f"/proc/{qemu_pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] != "0", "QEMU must not run as root"
    assert "Seccomp:\t2" in status, "QEMU must run under its seccomp filter"
    assert Path(f"/proc/{qemu_pid}/ns/net").resolve() != Path("/proc/self/ns/net").resolve()
    assert Path(f"/proc/{qemu_pid}/root").resolve() != Path("/")
    # ... and inside the VM's own cgroup, whose memory limit covers guest RAM plus QEMU.
    cgroups = Path(f"/proc/{qemu_pid}/cgroup").read_text()
    assert f"vm-{vm.id}" in cgroups
    limit_files = [f.parent / "memory.limit_in_bytes" for f in vm.cgroup.procs_files()]
    limit_files += [f.parent / "memory.max" for f in vm.cgroup.procs_files()]
    limits = [int(f.read_text()) for f in limit_files if f.exists()]
    assert limits and all(256 * 2**20 < x < 1024 * 2**20 for x in limits)
    # CPU: its vCPU plus a little for QEMU's own threads, never a second whole core.
    quotas = []
    for d in (f.parent for f in vm.cgroup.procs_files()):
        if (d / "cpu.max").exists():
            quota, period = (d / "cpu.max").read_text().split()
            quotas.append(int(quota) / int(period))
        elif (d / "cpu.cfs_quota_us").exists():
            quota_us = int((d / "cpu.cfs_quota_us").read_text())
            quotas.append(quota_us / int((d / "cpu.cfs_period_us").read_text()))
    assert quotas and all(vm.spec.vcpus < q < vm.spec.vcpus + 1 for q in quotas)


async def test_killing_a_vm_kills_all_of_its_cgroup(busybox_rootfs: Path) -> None:
    # A QEMU the guest took over may leave its process group (setsid is allowed while it
    # drops root): killing the group left it running, its cgroup and jail behind. Here a
    # process in the VM's cgroup but in a session of its own stands for it.
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    stray = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        for procs in vm.cgroup.procs_files():
            procs.write_text(str(stray.pid))
        await vm.kill()
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert not any(f.parent.exists() for f in vm.cgroup.procs_files())
    finally:
        stray.kill()
        stray.wait()


async def test_detached_vm_keeps_running_and_can_be_adopted(busybox_rootfs: Path) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    proc_id, _ = await vm.agent.spawn("echo before; sleep 1000")
    await vm.detach()
    assert vm.pid is not None and Path(f"/proc/{vm.pid}").exists()  # still running
    again = await MicroVM.adopt(vm.run_dir)
    try:
        assert again.id == vm.id and again.pid == vm.pid
        r = await again.agent.exec("echo after")
        assert r.stdout == b"after\n"
        procs = {p.proc_id for p in await again.agent.list_procs()}
        assert proc_id in procs  # the guest state survived the host letting go
    finally:
        usage = await again.kill()
    assert again.death_reason is not None
    assert usage.uptime_ms > 0
    assert_vm_gone(again)


async def test_two_vcpus_boot_and_keep_time(busybox_rootfs: Path) -> None:
    # Under TCG the guest's tick comes from the PIT (noapictimer): with two vCPUs it is
    # broadcast, and sleeps must still end on time on either CPU.
    vm = await MicroVM.boot(vm_spec(busybox_rootfs, vcpus=2))
    try:
        r = await vm.agent.exec("nproc; for c in 0 1; do taskset -c $c sleep 0.5 & done; wait")
        assert r.exit_code == 0, r.stderr
        assert r.stdout == b"2\n"
        t0 = asyncio.get_running_loop().time()
        r = await vm.agent.exec("sleep 1")
        assert r.exit_code == 0
        assert 0.9 < asyncio.get_running_loop().time() - t0 < 10
    finally:
        await vm.kill()
    assert_vm_gone(vm)


async def test_a_boot_cancelled_midway_leaves_no_task_error_or_file(
    busybox_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import gc
    from typing import Any

    monkeypatch.setenv("ISORUN_STATE_DIR", str(tmp_path))
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    before = asyncio.all_tasks()
    try:
        # Cancelled while QEMU starts, while the agent's hello is under way, near its end.
        for delay in (0.1, 0.3, 0.5):
            task = asyncio.create_task(MicroVM.boot(vm_spec(busybox_rootfs)))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await (await task).kill()  # it booted before the cancel landed
        await asyncio.sleep(1)
        gc.collect()
        assert [str(e.get("exception") or e["message"]) for e in errors] == []
        left = asyncio.all_tasks() - before - {asyncio.current_task()}
        assert not left, left
        assert list((tmp_path / "vms").iterdir()) == []
    finally:
        loop.set_exception_handler(None)


async def test_a_cancelled_kill_still_ends_the_vm_and_removes_everything(
    busybox_rootfs: Path,
) -> None:
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    try:
        task = asyncio.create_task(vm.kill())
        await asyncio.sleep(0)  # the kill waits for QEMU to go
        task.cancel()
        with pytest.raises(asyncio.CancelledError):  # the caller's cancel is not swallowed
            await task
        # ... but the VM's supervision and cleanup were not cut short by it.
        assert await asyncio.wait_for(vm.wait(), 10) == "killed by signal 9"
        await asyncio.wait_for(vm.kill(), 10)
        assert_vm_gone(vm)
    finally:
        await vm.kill()


async def test_adopt_gives_up_within_its_timeout_when_qmp_does_not_answer(
    busybox_rootfs: Path,
) -> None:
    import socket

    from isorun.errors import VMError

    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await vm.detach()
        # Another client holds QEMU's only QMP connection: a new one is queued, unanswered.
        holder.connect(str(vm.run_dir / "qmp.sock"))
        with pytest.raises(VMError, match="QMP"):
            await asyncio.wait_for(MicroVM.adopt(vm.run_dir, timeout=2), 20)
    finally:
        holder.close()
        again = await MicroVM.adopt(vm.run_dir)
        await again.kill()
        assert_vm_gone(again)


async def test_a_state_directory_with_a_comma_boots(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QEMU splits option values at commas: every path it is given must escape them
    # (the disks and the jail's chroot live under the state directory).
    state = Path(tempfile.mkdtemp(prefix="st,a,"))
    monkeypatch.setenv("ISORUN_STATE_DIR", str(state))
    try:
        vm = await MicroVM.boot(vm_spec(busybox_rootfs))
        try:
            assert vm.run_dir.is_relative_to(state)
            r = await vm.agent.exec("echo ok")
            assert r.stdout == b"ok\n"
        finally:
            await vm.kill()
        assert_vm_gone(vm)
    finally:
        shutil.rmtree(state)


async def test_a_state_directory_too_long_for_a_socket_is_a_clear_error(
    busybox_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / ("d" * 100)
    monkeypatch.setenv("ISORUN_STATE_DIR", str(state))
    with pytest.raises(ConfigError, match="ISORUN_STATE_DIR") as err:
        await MicroVM.boot(vm_spec(busybox_rootfs))
    assert "longer than" in str(err.value)
    assert not any((state / "vms").iterdir()), "a run directory was left behind"


async def test_a_full_host_disk_under_the_scratch_disk_is_the_guests_io_error(
    busybox_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scratch disk is a sparse file in the run directory: the host filesystem under it
    # can fill before the guest's does. The guest gets an I/O error and goes on (QEMU's
    # default stopped the whole VM: every request then hung, with no death reason).
    state = tmp_path / "small"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(state)], check=True)
    monkeypatch.setenv("ISORUN_STATE_DIR", str(state))
    try:
        vm = await MicroVM.boot(vm_spec(busybox_rootfs))
        try:
            r = await asyncio.wait_for(
                vm.agent.exec("dd if=/dev/urandom of=/big bs=1M count=16 conv=fsync"), 120
            )
            assert r.exit_code != 0 and b"Input/output error" in r.stderr, r
            assert (await vm.agent.exec("rm /big; echo alive")).stdout == b"alive\n"
            assert vm.alive and vm.death_reason is None
        finally:
            await vm.kill()
        assert_vm_gone(vm)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
