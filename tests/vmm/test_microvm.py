"""Real QEMU guests (TCG here): exec, streaming, processes, files, system ops."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from vmhelpers import vm_spec

from isorun.agent import Attachment
from isorun.errors import FileNotFoundInGuest, GuestError
from isorun.vmm import MicroVM

pytestmark = pytest.mark.vm


async def _wait_for_file(vm: MicroVM, path: str) -> None:
    r = await vm.agent.exec(f"until [ -e {path} ]; do sleep 0.05; done", timeout=30)
    assert r.exit_code == 0 and not r.timed_out, f"{path} never appeared"


async def _wait_for_exit(vm: MicroVM, proc_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not {p.proc_id: p for p in await vm.agent.list_procs()}[proc_id].running:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{proc_id} still running after {timeout} s")


async def test_output_streams_line_by_line_while_the_command_runs(vm: MicroVM) -> None:
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.monotonic()
    r = await vm.agent.exec(
        "for i in 1 2 3; do echo $i; sleep 1; done",
        on_stdout=lambda b: arrivals.append((time.monotonic() - t0, b)),
    )
    assert r.exit_code == 0
    assert r.stdout == b"1\n2\n3\n"
    assert [b for _, b in arrivals] == [b"1\n", b"2\n", b"3\n"]
    # Each line arrived about a second after the previous one, not all at the end (a gap
    # near 0); the margin is for a line held up on a busy host.
    assert arrivals[1][0] - arrivals[0][0] > 0.3
    assert arrivals[2][0] - arrivals[1][0] > 0.3


async def test_stdout_and_stderr_stay_separate_with_exit_code(vm: MicroVM) -> None:
    r = await vm.agent.exec("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    assert vm.accel.name in ("tcg", "kvm")


async def test_command_not_found_is_a_127_result_not_an_exception(vm: MicroVM) -> None:
    r = await vm.agent.exec("no-such-program --flag")
    assert r.exit_code == 127
    assert b"not found" in r.stderr
    r = await vm.agent.exec(argv=["/no/such/binary"])
    assert r.exit_code == 127
    assert b"/no/such/binary" in r.stderr
    # a command line that looks like a shell option is still the command, not sh's option
    r = await vm.agent.exec("-x")
    assert r.exit_code == 127
    assert b"-x" in r.stderr and b"not found" in r.stderr


async def test_env_cwd_user_and_argv(vm: MicroVM) -> None:
    r = await vm.agent.exec(
        argv=["sh", "-c", 'echo "$GREETING $(pwd) $(id -u)"'],
        env={"GREETING": "hi there"},
        cwd="/tmp",
        user="user",
    )
    assert r.stdout == b"hi there /tmp 1000\n"
    await vm.agent.set_defaults(env={"FROM_IMAGE": "yes"}, cwd="/home/user")
    r = await vm.agent.exec('echo "$FROM_IMAGE $(pwd)"')
    assert r.stdout == b"yes /home/user\n"


async def test_stdin_is_binary_safe(vm: MicroVM) -> None:
    data = bytes(range(256)) * 4096 + os.urandom(100_000)
    r = await vm.agent.exec("cat", stdin=data)
    assert r.exit_code == 0
    assert r.stdout == data


async def test_timeout_kills_the_command(vm: MicroVM) -> None:
    r = await vm.agent.exec("sleep 100", timeout=1)
    assert r.timed_out
    assert r.exit_code is None or r.exit_code != 0


async def test_process_ignoring_sigterm_is_killed_by_escalation(vm: MicroVM) -> None:
    proc_id, _ = await vm.agent.spawn("trap '' TERM; touch /tmp/armed; while :; do sleep 1; done")
    # Wait for the trap (a SIGTERM before it would end the loop at once), not a fixed time.
    await _wait_for_file(vm, "/tmp/armed")
    t0 = time.monotonic()
    _, sig = await vm.agent.kill(proc_id, grace=1.0)
    assert sig == 9
    assert time.monotonic() - t0 >= 0.9
    procs = {p.proc_id: p for p in await vm.agent.list_procs()}
    assert not procs[proc_id].running


async def test_background_output_replays_from_any_offset(vm: MicroVM) -> None:
    proc_id, pid = await vm.agent.spawn("for i in 1 2 3 4 5; do echo line$i; done; sleep 0.3")
    assert pid > 1
    r = await vm.agent.attach(proc_id, offset=0)
    assert r.stdout == b"line1\nline2\nline3\nline4\nline5\n"
    assert r.exit_code == 0
    at = Attachment(offset=0)
    r2 = await vm.agent.attach(proc_id, offset=6, attachment=at)
    assert at.offset == 6
    assert r2.stdout == b"line2\nline3\nline4\nline5\n"


async def test_ring_buffer_reports_lost_bytes(vm: MicroVM) -> None:
    proc_id, _ = await vm.agent.spawn("head -c 200000 /dev/zero", ring_bytes=65536)
    await _wait_for_exit(vm, proc_id)  # all 200000 bytes went through the ring
    at = Attachment(offset=0)
    r = await vm.agent.attach(proc_id, offset=0, attachment=at)
    assert at.lost == 200000 - 65536
    assert len(r.stdout) == 65536


async def test_pty_session_with_resize(vm: MicroVM) -> None:
    r = await vm.agent.exec("tty; stty size", pty=(24, 80))
    assert b"/dev/pts/" in r.stdout
    assert b"24 80" in r.stdout
    # stty runs only after the resize was acknowledged, however slow the guest is.
    proc_id, _ = await vm.agent.spawn(
        "until [ -e /tmp/resized ]; do sleep 0.05; done; stty size", pty=(24, 80)
    )
    await vm.agent.resize(proc_id, 40, 120)
    await vm.agent.exec("touch /tmp/resized")
    r = await vm.agent.attach(proc_id)
    assert b"40 120" in r.stdout


async def test_files_round_trip(vm: MicroVM) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    assert await vm.agent.write_file("/work/data/blob.bin", blob) == len(blob)
    assert await vm.agent.read_bytes("/work/data/blob.bin") == blob
    st = await vm.agent.stat("/work/data/blob.bin")
    assert (st.type, st.size) == ("file", len(blob))
    await vm.agent.mkdir("/work/a/b/c")
    await vm.agent.write_file("/work/a/b/c/x.txt", b"x")
    names = {e.path for e in await vm.agent.list("/work", depth=4)}
    assert {"/work/data", "/work/data/blob.bin", "/work/a/b/c/x.txt"} <= names
    await vm.agent.rename("/work/a/b/c/x.txt", "/work/y.txt")
    assert await vm.agent.exists("/work/y.txt")
    assert not await vm.agent.exists("/work/a/b/c/x.txt")
    assert not await vm.agent.exists("/work/y.txt/under-a-file")  # not_dir: not there
    # what the files API makes is the named user's (default: the sandbox's user)
    await vm.agent.write_file("/work/u/notes.txt", b"n", user="1000:1000")
    await vm.agent.mkdir("/work/v/w", user="1000:1000", mode=0o700)
    owners = await vm.agent.exec("stat -c '%u:%g %a' /work/u /work/u/notes.txt /work/v /work/v/w")
    assert owners.stdout == b"1000:1000 755\n1000:1000 644\n1000:1000 755\n1000:1000 700\n"
    as_user = await vm.agent.exec(
        "echo more >> /work/u/notes.txt && touch /work/v/w/f", user="1000:1000"
    )
    assert as_user.exit_code == 0, as_user.stderr
    with pytest.raises(GuestError):
        await vm.agent.remove("/work/a")  # not empty, not recursive
    await vm.agent.remove("/work/a", recursive=True)
    with pytest.raises(FileNotFoundInGuest):
        await vm.agent.stat("/work/a")
    # The file the command sees is the one we wrote.
    r = await vm.agent.exec("md5sum /work/data/blob.bin")
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.md5(blob).hexdigest()


async def test_a_directory_of_the_image_can_be_renamed(vm: MicroVM) -> None:
    # A directory from the read-only image, not one written since: the overlay must
    # redirect it (without redirect_dir, rename(2) of it fails EXDEV in the guest too).
    await vm.agent.rename("/etc", "/etc.moved")
    try:
        assert await vm.agent.read_bytes("/etc.moved/passwd")
        assert not await vm.agent.exists("/etc")
    finally:
        await vm.agent.rename("/etc.moved", "/etc")
    r = await vm.agent.exec("mv /home /home.moved && ls -d /home.moved && mv /home.moved /home")
    assert (r.exit_code, r.stdout) == (0, b"/home.moved\n"), r.stderr
    assert (await vm.agent.exec("grep -c root /etc/passwd")).stdout == b"1\n"


async def test_a_write_the_guest_refuses_fails_at_once_and_the_channel_works_on(
    vm: MicroVM,
) -> None:
    # The agent answers before taking the upload and credits none of the rest: the host
    # must read that answer instead of waiting for credit it will never get.
    with pytest.raises(GuestError, match="directory"):
        await asyncio.wait_for(vm.agent.write_file("/tmp", b"x" * (4 << 20)), 30)
    assert (await vm.agent.exec("echo still here")).stdout == b"still here\n"


async def test_watch_reports_changes(vm: MicroVM) -> None:
    await vm.agent.mkdir("/watched/sub")
    assert "watch_ready" in vm.agent.conn.features
    # open_watch returns once the guest watches: the very next change is reported, and
    # write_file's own temporary file is not (its write is the create of its target).
    w = await vm.agent.open_watch("/watched", recursive=True)
    try:
        await vm.agent.exec("echo hi > /watched/f; rm /watched/f")
        await vm.agent.write_file("/watched/sub/g", b"g")
        seen: list[tuple[str, str]] = []
        async with asyncio.timeout(20):
            async for change in w:
                seen.append(change)
                if change == ("create", "/watched/sub/g"):
                    break
    finally:
        w.close()
    ops = [op for op, path in seen if path == "/watched/f"]
    assert "create" in ops and "remove" in ops, seen
    assert not [p for _, p in seen if ".isorun-" in p], seen
    with pytest.raises(FileNotFoundInGuest):
        await vm.agent.open_watch("/no/such/dir")


async def test_system_ops(vm: MicroVM) -> None:
    m = await vm.agent.metrics()
    assert 100 * 2**20 < m["mem_total_bytes"] <= 256 * 2**20
    target = 2_000_000_000 * 10**9  # 2033-05-18
    await vm.agent.set_clock(target)
    r = await vm.agent.exec("date +%s")
    assert abs(int(r.stdout) - 2_000_000_000) < 10
    await vm.agent.reseed(os.urandom(64))
    with pytest.raises(GuestError):
        await vm.agent.reseed(b"short")
    h = await vm.agent.health()
    assert h["ok"] is True


async def test_signal_reaches_the_process_and_is_reported(vm: MicroVM) -> None:
    proc_id, _ = await vm.agent.spawn("sleep 1000")
    await vm.agent.signal(proc_id, 15)
    r = await vm.agent.attach(proc_id)
    assert (r.exit_code, r.signal) == (None, 15)


async def test_a_tcg_guest_copies_memory_without_byte_wise_rep_movsb(vm: MicroVM) -> None:
    # TCG runs `rep movsb` a byte per iteration: the guest must not be told it is fast
    # (qemu_cmd.TCG_CPU), or every copy in its kernel and libc takes that path.
    if vm.accel.name != "tcg":
        pytest.skip("a KVM guest sees the host's CPU")
    r = await vm.agent.exec("grep -m1 '^flags' /proc/cpuinfo")
    flags = set(r.stdout.decode().split(":", 1)[1].split())
    assert {"sse2", "avx2"} <= flags  # still the full TCG CPU
    assert not flags & {"erms", "fsrm"}


async def test_qemu_gets_none_of_the_hosts_environment_but_its_path(
    busybox_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's environment holds the operator's secrets (a proxy's password, cloud
    # keys); a guest that broke into QEMU could read them in its /proc/self/environ.
    monkeypatch.setenv("HTTPS_PROXY", "http://puller:S3cr3t@proxy.internal:3128")
    vm = await MicroVM.boot(vm_spec(busybox_rootfs))
    try:
        pids = [int(p) for f in vm.cgroup.procs_files() for p in f.read_text().split()]
        assert pids, "nothing in the VM's cgroup"
        for pid in pids:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            names = {e.split(b"=", 1)[0] for e in env if e}
            # (PWD: the shell that puts QEMU in its cgroups sets it)
            assert names <= {b"PATH", b"LC_ALL", b"PWD"}, (pid, names)
    finally:
        await vm.kill()


async def test_a_name_that_is_not_utf8_is_listed_as_one_that_names_it(vm: MicroVM) -> None:
    # A program's Latin-1 name: listed (and watched) as Python holds such a name, its bytes
    # that are no UTF-8 as surrogates (os.fsdecode), which the files API takes back.
    name = os.fsdecode(b"caf\xe9")
    await vm.agent.mkdir("/latin")
    w = await vm.agent.open_watch("/latin")
    try:
        assert (
            await vm.agent.exec(argv=["sh", "-c", "printf x > /latin/caf$(printf '\\351')"])
        ).exit_code == 0
        async with asyncio.timeout(20):
            change = await anext(w)
    finally:
        w.close()
    assert change == ("create", f"/latin/{name}")
    [entry] = await vm.agent.list("/latin")
    assert (entry.name, entry.path) == (name, f"/latin/{name}")
    assert os.fsencode(entry.name) == b"caf\xe9"
    assert await vm.agent.read_bytes(entry.path) == b"x"
    await vm.agent.write_file(entry.path, b"rewritten")
    await vm.agent.rename(entry.path, "/latin/" + os.fsdecode(b"\xff\xfe"))
    ls = await vm.agent.exec(argv=["sh", "-c", "printf %s /latin/*"])
    assert ls.stdout == b"/latin/\xff\xfe", ls.stdout
    assert (await vm.agent.stat("/latin/" + os.fsdecode(b"\xff\xfe"))).size == len(b"rewritten")
    await vm.agent.remove("/latin/" + os.fsdecode(b"\xff\xfe"))
    assert await vm.agent.list("/latin") == []
