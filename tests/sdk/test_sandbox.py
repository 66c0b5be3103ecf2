"""The SDK against a real daemon and guest: sync and async faces, errors, auto-start."""

from __future__ import annotations

import asyncio
import io
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from isorun import (
    AsyncSandbox,
    CommandFailed,
    DaemonUnavailable,
    IsorunError,
    NotFoundError,
    Sandbox,
    SandboxEndedError,
)
from isorun.sdk import SandboxClosedError


class _TextReader:
    """A reader in text mode that is not an io.TextIOBase: its read() gives "" at the end."""

    def __init__(self, text: str) -> None:
        self._text = text

    def read(self, n: int = -1) -> str:
        got, self._text = self._text, ""
        return got


pytestmark = pytest.mark.vm


def test_sync_surface(api: str, image: str) -> None:
    chunks: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with Sandbox(image, api_url=api, metadata={"who": "sdk"}, sandbox_timeout=120) as sb:
        r = sb.exec(
            "echo a; sleep 1; echo b; echo err >&2",
            on_stdout=lambda s: chunks.append((time.monotonic() - t0, s)),
        )
        assert (r.stdout, r.stderr, r.exit_code) == ("a\nb\n", "err\n", 0)
        assert [c for _, c in chunks] == ["a\n", "b\n"] and chunks[1][0] - chunks[0][0] > 0.3
        assert r.duration_ms >= 900
        assert (
            sb.exec(["sh", "-c", "cat; echo $X"], stdin="in\n", env={"X": "y"}).stdout == "in\ny\n"
        )
        with pytest.raises(CommandFailed, match="exited with 3"):
            sb.exec("exit 3", check=True)
        # files
        assert sb.files.write("/tmp/f/a.txt", "héllo") == 6
        assert sb.files.read("/tmp/f/a.txt") == "héllo"
        for buf in (bytearray(b"ba"), memoryview(b"mv")):  # any bytes-like object
            assert sb.files.write("/tmp/f/like", buf) == 2
            assert sb.files.read("/tmp/f/like", format="bytes") == bytes(buf)
        sb.files.remove("/tmp/f/like")
        sb.files.write("/tmp/f/b.bin", io.BytesIO(b"\x00" * 300_000))
        assert sb.files.read("/tmp/f/b.bin", format="bytes") == b"\x00" * 300_000
        assert b"".join(sb.files.read("/tmp/f/b.bin", format="stream")) == b"\x00" * 300_000
        assert sb.files.stat("/tmp/f/b.bin").size == 300_000
        # text where bytes are needed: refused, saying so (a raw TypeError, or a write loop
        # that never saw the b"" it waited for)
        for text in (io.StringIO("abc"), _TextReader("abc"), _TextReader(""), iter(["abc"])):
            with pytest.raises(TypeError, match=r"needs bytes.*text \(str\)"):
                sb.files.write("/tmp/f/t.txt", text)
        with pytest.raises(TypeError, match="needs bytes"):  # a str after bytes: mid-upload
            sb.files.write("/tmp/f/t.txt", iter([b"ab", "cd"]))
        assert not sb.files.exists("/tmp/f/t.txt")  # nothing half-written
        # a path under a file is not there (as os.path.exists), not an ApiError 400
        assert not sb.files.exists("/tmp/f/b.bin/x")
        assert sb.exec("pwd", cwd=Path("/tmp/f")).stdout == "/tmp/f\n"
        sb.files.rename("/tmp/f/a.txt", "/tmp/f/c.txt")
        assert sorted(f.name for f in sb.files.list("/tmp/f")) == ["b.bin", "c.txt"]
        sb.files.remove("/tmp/f", recursive=True)
        assert not sb.files.exists("/tmp/f")
        with pytest.raises(NotFoundError):
            sb.files.read("/tmp/f/c.txt")
        # background processes
        # output callbacks and check= would be ignored by a background exec: refused
        with pytest.raises(ValueError, match=r"on_stdout with background=True.*wait\(\)"):
            sb.exec("echo lost", background=True, on_stdout=print)
        with pytest.raises(ValueError, match=r"on_stdout and on_stderr.*iterate"):
            sb.exec("true", background=True, on_stdout=print, on_stderr=print)
        with pytest.raises(ValueError, match=r"check=True with background=True.*exit_code"):
            sb.exec("exit 1", background=True, check=True)
        assert not [q for q in sb.processes.list() if q.running]  # none of them started
        p = sb.exec("for i in 1 2 3; do echo $i; sleep 0.2; done", background=True)
        # in logs and at the REPL a handle says which one it is, not an object address
        assert repr(p) == f"<Process {p.id} pid={p.pid} sandbox={sb.id}>"
        assert repr(sb) == f"<Sandbox {sb.id} image={image}>"
        assert [t for _, t in p] == ["1\n", "2\n", "3\n"]
        assert p.wait(offset=2).stdout == "2\n3\n"
        assert p.id in {q.proc_id for q in sb.processes.list()}
        # one started with a long script is listed too (its argv cut), so it can be killed
        loop = sb.exec("sleep 1000 # " + "<&>" * 12000, background=True)
        (listed,) = [q for q in sb.processes.list() if q.proc_id == loop.id]
        assert listed.argv_truncated and listed.argv[2].startswith("sleep 1000 # <&>")
        assert sb.processes.connect(loop.id).kill(grace=0.2)["signal"] in (9, 15)
        # connect / list / set_timeout
        assert [s["id"] for s in Sandbox.list(metadata={"who": "sdk"}, api_url=api)] == [sb.id]
        again = Sandbox.connect(sb.id, api_url=api)
        assert again.exec("echo same").stdout == "same\n"
        again.close()
        with pytest.raises(SandboxClosedError, match=rf"Sandbox\.connect\('{sb.id}'\)"):
            again.exec("echo closed")  # it was httpx's RuntimeError
        sb.set_timeout(3600)
        assert sb.info()["sandbox_timeout"] == 3600
        sid = sb.id
    usage = sb.destroy()  # second call: same figures, no error
    assert repr(sb) == f"<Sandbox {sid} image={image} destroyed>"
    # what it measured, and what the daemon billed for it (it used to be dropped)
    assert set(usage) == {"cpu_ms", "mem_peak_bytes", "uptime_ms", "billed_seconds", "cost_usd"}
    assert usage["cpu_ms"] > 0 and usage["mem_peak_bytes"] > 0 and usage["uptime_ms"] > 0
    assert usage["billed_seconds"] == -(-usage["uptime_ms"] // 1000)
    assert usage.get("cost_usd", -1) >= 0
    with pytest.raises(SandboxEndedError, match=f"sandbox {sid} was destroyed"):
        sb.exec("echo after")  # after its with block: it was httpx's RuntimeError
    with pytest.raises(SandboxEndedError):
        Sandbox.connect(sid, api_url=api)
    with pytest.raises(NotFoundError):
        Sandbox.connect("sb-doesnotexist", api_url=api)


async def test_async_surface(api: str, image: str) -> None:
    seen: list[str] = []
    unstarted = AsyncSandbox(image, api_url=api)
    assert repr(unstarted) == "<AsyncSandbox (not started)>"
    await unstarted.close()
    async with AsyncSandbox(image, api_url=api) as sb:
        r = await sb.exec("echo x; exit 5", on_stdout=seen.append)
        assert (r.stdout, r.exit_code, seen) == ("x\n", 5, ["x\n"])
        await sb.files.write("/tmp/q", b"qq")
        assert await sb.files.read("/tmp/q") == "qq"
        for text in (io.StringIO("abc"), _TextReader(""), iter(["abc"])):
            with pytest.raises(TypeError, match=r"needs bytes.*text \(str\)"):
                await sb.files.write("/tmp/t", text)
        assert not await sb.files.exists("/tmp/q/x")
        assert (await sb.exec("pwd", cwd=Path("/tmp"))).stdout == "/tmp\n"
        with pytest.raises(ValueError, match="on_stderr with background=True"):
            await sb.exec("true", background=True, on_stderr=print)
        with pytest.raises(ValueError, match="check=True with background=True"):
            await sb.exec("true", background=True, check=True)
        p = await sb.exec("echo bg", background=True)
        assert repr(p) == f"<AsyncProcess {p.id} pid={p.pid} sandbox={sb.id}>"
        assert (await p.wait()).stdout == "bg\n"
        other = await AsyncSandbox.connect(sb.id, api_url=api)
        assert (await other.exec("echo o")).stdout == "o\n"
        await other.close()
        with pytest.raises(SandboxClosedError, match=rf"AsyncSandbox\.connect\('{sb.id}'\)"):
            await other.files.read("/tmp/q")
        assert "isorun-agent: ready" in await sb.logs()
        real_id, sb.id = sb.id, "0" * len(sb.id)
        try:
            with pytest.raises(NotFoundError):
                await sb.logs()
        finally:
            sb.id = real_id
    usage = await sb.destroy()
    assert usage["uptime_ms"] > 0 and usage.get("billed_seconds", 0) > 0
    with pytest.raises(SandboxEndedError, match="was destroyed"):
        await sb.exec("echo after")


SPLIT_UTF8 = "printf 'caf\\303'; sleep 0.5; printf '\\251!\\n'"  # é split across two writes
# é split across two writes, then output ending inside a character (its first two bytes)
CUT_UTF8 = "printf '\\303'; sleep 0.5; printf '\\251abc\\342\\202'"


async def test_async_callbacks_are_awaited_and_split_characters_come_whole(
    api: str, image: str
) -> None:
    seen: list[str] = []

    async def slow_append(text: str) -> None:
        await asyncio.sleep(0.01)
        seen.append(text)

    async with AsyncSandbox(image, api_url=api) as sb:
        r = await sb.exec("echo one; echo two >&2", on_stdout=slow_append, on_stderr=slow_append)
        assert sorted(seen) == ["one\n", "two\n"] and r.stdout == "one\n"
        p = await sb.exec(SPLIT_UTF8, background=True)
        chunks = [text async for _, text in p]
        assert "".join(chunks) == "café!\n" and "\ufffd" not in "".join(chunks), chunks
        seen.clear()
        assert (await p.wait(on_stdout=slow_append)).stdout == "café!\n"
        assert "".join(seen) == "café!\n"
        # callbacks get no empty text for a chunk holding part of a character, and the end's
        # incomplete one as the result has it: they used to see "" then "éabc" only
        seen.clear()
        r = await sb.exec(CUT_UTF8, on_stdout=slow_append)
        assert "".join(seen) == r.stdout == "éabc\ufffd" and "" not in seen, seen


async def test_an_async_with_block_ended_by_an_anyio_cancel_scope_still_ends_its_sandbox(
    api: str, image: str
) -> None:
    # An anyio scope's cancellation is level-triggered: every await in it is cancelled,
    # the DELETE of __aexit__ included, and the sandbox ran on, billed, until its timeout.
    made: list[str] = []
    with anyio.CancelScope() as scope:
        async with AsyncSandbox(image, api_url=api) as sb:
            made.append(sb.id)
            scope.cancel()
            await sb.exec("sleep 60")
    assert scope.cancelled_caught
    ended = {s["id"]: s for s in Sandbox.list(include_ended=True, api_url=api)}
    assert ended[made[0]]["state"] == "ended", ended[made[0]]


def test_a_replay_past_the_ring_says_how_much_output_is_missing(api: str, image: str) -> None:
    with Sandbox(image, api_url=api) as sb:
        p = sb.exec("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo end", background=True)
        while any(i.running for i in sb.processes.list() if i.proc_id == p.id):
            time.sleep(0.1)  # all written before anyone reads: the ring kept the last 1 MiB
        r = p.wait()
        assert r.exit_code == 0 and r.stdout.endswith("x\nend\n")
        assert len(r.stdout_bytes) + r.output_lost == 3_000_000 + 5, (len(r.stdout), r.output_lost)
        assert r.output_lost > 0 and sb.exec("echo whole").output_lost == 0


FLOOD = "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo end; echo oops >&2"
FLOOD_OUT = 3_000_000 + 5  # "x"*3000000 + "\n" + "end\n"


async def test_a_capture_keeps_each_streams_newest_bytes_up_to_its_limit(
    api: str, image: str
) -> None:
    """exec and Process.wait kept every byte of output even while callbacks streamed it
    (512 MiB of output: 1.5 GiB in the caller). A result keeps each stream's newest
    `capture_limit` bytes (64 MiB by default) and counts the rest in `*_dropped`."""
    seen = 0

    def count(text: str) -> None:
        nonlocal seen
        seen += len(text)

    async with AsyncSandbox(image, api_url=api) as asb:
        sb = Sandbox.connect(asb.id, api_url=api)
        try:
            r = sb.exec(FLOOD, on_stdout=count, capture_limit=1 << 20)
            assert seen == FLOOD_OUT  # the callback saw it all
            assert (len(r.stdout_bytes), r.stdout_dropped) == (1 << 20, FLOOD_OUT - (1 << 20))
            assert r.stdout.endswith("xx\nend\n") and (r.stderr, r.stderr_dropped) == ("oops\n", 0)
            whole = sb.exec(FLOOD)  # the default keeps a normal output whole
            assert (len(whole.stdout_bytes), whole.stdout_dropped) == (FLOOD_OUT, 0)
            p = sb.exec(FLOOD, background=True)
            seen = 0
            w = p.wait(on_stdout=count, capture_limit=0)  # streamed only, nothing kept
            assert (w.stdout_bytes, w.stderr_bytes, w.exit_code) == (b"", b"", 0)
            assert w.stdout_dropped == seen and w.stderr_dropped == 5
            assert w.stdout_dropped + w.stderr_dropped + w.output_lost == FLOOD_OUT + 5
            with pytest.raises(ValueError, match="capture_limit"):
                sb.exec("true", capture_limit=-1)
        finally:
            sb.close()  # the async face destroys it
        a = await asb.exec(FLOOD, capture_limit=1000)
        assert (a.stdout_bytes, a.stdout_dropped) == (b"x" * 995 + b"\nend\n", FLOOD_OUT - 1000)
        q = await asb.exec(FLOOD, background=True)
        b = await q.wait(capture_limit=10)
        assert (b.stdout, b.stderr, b.stderr_dropped) == ("xxxxx\nend\n", "oops\n", 0)


def test_sync_refuses_async_callbacks_and_iterates_split_characters_whole(
    api: str, image: str
) -> None:
    async def cb(text: str) -> None:
        pass

    with Sandbox(image, api_url=api) as sb:
        with pytest.raises(TypeError, match=r"on_stdout returned an awaitable.*AsyncSandbox"):
            sb.exec("echo x", on_stdout=cb)
        chunks = [text for _, text in sb.exec(SPLIT_UTF8, background=True)]
        assert "".join(chunks) == "café!\n" and "\ufffd" not in "".join(chunks), chunks
        got: list[str] = []
        r = sb.exec(CUT_UTF8, on_stdout=got.append)
        assert "".join(got) == r.stdout == "éabc\ufffd" and "" not in got, got


def test_errors_name_what_to_change(api: str) -> None:
    with pytest.raises(IsorunError, match="memory_mib"):
        Sandbox("base", memory_mib=-1, api_url=api)
    with pytest.raises(NotFoundError, match="not found"):
        Sandbox("rootfs:/no/such/file.ext4", api_url=api)


def test_autostart_and_switching_it_off(tmp_path: Path) -> None:
    sock = tmp_path / "auto.sock"
    env = dict(os.environ, ISORUN_SOCKET=str(sock), ISORUN_STATE_DIR=str(tmp_path / "state"))
    env.pop("ISORUN_API_URL", None)
    code = "from isorun import Sandbox; print(len(Sandbox.list()))"
    off = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ISORUN_AUTOSTART": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert off.returncode != 0 and "DaemonUnavailable" in off.stderr and "isorund" in off.stderr
    on = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    try:
        assert on.returncode == 0, on.stderr
        assert on.stdout.strip() == "0"
        assert sock.stat().st_mode & 0o777 == 0o600
    finally:
        pid = int((tmp_path / "state" / "isorund.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert DaemonUnavailable.__mro__[1] is IsorunError


def test_a_watch_reports_what_changes_after_it_returns(api: str, image: str) -> None:
    with Sandbox(image, api_url=api) as sb:
        sb.files.mkdir("/tmp/w")
        with sb.files.watch("/tmp/w") as w:
            sb.files.write("/tmp/w/a", "x")  # at once: the watch is on when watch() returns
            assert next(w) == ("create", "/tmp/w/a")
            sb.files.remove("/tmp/w", recursive=True)
            rest = list(w)  # ends with the watched directory
        assert ("remove", "/tmp/w/a") in rest and rest[-1] == ("remove", "/tmp/w"), rest


async def test_an_async_watch_reports_what_changes_after_it_is_awaited(
    api: str, image: str
) -> None:
    async with AsyncSandbox(image, api_url=api) as sb:
        await sb.files.mkdir("/tmp/aw")
        async with await sb.files.watch("/tmp/aw") as w:
            await sb.files.write("/tmp/aw/a", "x")
            assert await anext(w) == ("create", "/tmp/aw/a")
        with pytest.raises(NotFoundError):
            await sb.files.watch("/tmp/missing")


def test_a_name_that_is_not_utf8_round_trips_as_str_or_bytes(api: str, image: str) -> None:
    """A program's Latin-1 file name is listed and watched as os.fsdecode holds it, and
    that str (or the raw bytes) names the file again for every files call."""
    latin = os.fsdecode(b"/tmp/n/caf\xe9")
    with Sandbox(image, api_url=api) as sb:
        sb.files.mkdir("/tmp/n")
        with sb.files.watch(b"/tmp/n") as w:
            assert sb.exec("printf x > /tmp/n/caf$(printf '\\351')").exit_code == 0
            assert next(w) == ("create", latin)
        [entry] = sb.files.list("/tmp/n")
        assert (entry.name, entry.path) == (os.fsdecode(b"caf\xe9"), latin)
        assert sb.files.read(entry.path) == "x" and sb.files.stat(b"/tmp/n/caf\xe9").size == 1
        sb.files.write(b"/tmp/n/caf\xe9", b"yz", append=True)
        sb.files.rename(latin, b"/tmp/n/\xff")
        assert sb.exec("cat /tmp/n/*; printf %s /tmp/n/*").stdout_bytes == b"xyz/tmp/n/\xff"
        sb.files.remove(os.fsdecode(b"/tmp/n/\xff"))
        assert sb.files.list("/tmp/n") == []
        sb.files.mkdir(b"/tmp/n/d\xe9")  # a command runs there too
        for cwd in (os.fsdecode(b"/tmp/n/d\xe9"), b"/tmp/n/d\xe9"):
            assert sb.exec("pwd", cwd=cwd).stdout_bytes == b"/tmp/n/d\xe9\n"
        with pytest.raises(ValueError, match="stands for no byte"):
            sb.files.stat("/tmp/\ud800")


def test_relative_paths_are_from_the_working_directory(api: str, image: str) -> None:
    """As a shell's: a file written as "notes.txt" is the one `cat notes.txt` reads, and an
    exec's relative cwd is a directory below the working directory (E2B resolves relative
    paths against the user's home; here it is the image's WORKDIR, where commands run)."""
    with Sandbox(image, api_url=api) as sb:
        wd = sb.exec("pwd").stdout.strip()
        sb.files.write("notes.txt", "hi")
        assert sb.exec("cat notes.txt").stdout == "hi"
        assert sb.files.read(posixpath.join(wd, "notes.txt")) == "hi"
        sb.files.mkdir("sub/deeper")
        sb.files.rename("notes.txt", "sub/n.txt")
        r = sb.exec("pwd; cat n.txt", cwd="sub")
        assert r.stdout == posixpath.join(wd, "sub") + "\nhi", r.stderr
        with pytest.raises(NotFoundError, match=re.escape(posixpath.join(wd, "no/such"))):
            sb.files.watch("no/such")
        # a mode reaches the guest as the bits asked for (the API reads it as octal)
        sb.files.write("run.sh", "#!/bin/sh\necho ran\n", mode=0o4751)
        assert sb.exec("./run.sh; stat -c %a run.sh").stdout == "ran\n4751\n"


def test_stream_errors_raise_the_matching_exception(api: str, image: str) -> None:
    """Errors raise the matching exception: a watch of a missing path is NotFoundError (it
    used to end silently with no events); an exec the guest could not run (a NUL in its
    command line) is refused as a 422, not a 500, and the sandbox works on."""
    from isorun import ApiError

    with Sandbox(image, api_url=api) as sb:
        with pytest.raises(NotFoundError, match="/no/such/dir"):
            sb.files.watch("/no/such/dir")
        with pytest.raises(ApiError, match="without NUL") as bad:
            sb.files.watch("dir\x00")
        assert bad.value.status == 400
        for line in (["echo", "a\x00b"], "echo a\x00b"):  # refused before the guest sees it
            with pytest.raises(ApiError, match=r"argv|cmd") as nul:
                sb.exec(line)
            assert nul.value.status == 422, nul.value
        assert sb.exec("echo still fine").stdout == "still fine\n"
        assert "isorun-agent: ready" in sb.logs()
        real_id, sb.id = sb.id, "0" * len(sb.id)
        try:
            with pytest.raises(NotFoundError):
                sb.logs()  # the error JSON used to come back as the "logs"
        finally:
            sb.id = real_id


async def test_async_files_stream_both_ways_like_the_sync_face(api: str, image: str) -> None:
    blob = bytes(range(256)) * (12 << 10)  # 3 MiB
    async with AsyncSandbox(image, api_url=api) as sb:
        # A binary file object and a sync iterable, as the sync face takes them.
        assert await sb.files.write("/tmp/a.bin", io.BytesIO(blob)) == len(blob)
        assert await sb.files.write("/tmp/b.bin", iter([blob[:5], blob[5:]]), mode=0o640) == len(
            blob
        )
        assert (await sb.exec("stat -c %a /tmp/b.bin")).stdout == "640\n"
        stream = await sb.files.read("/tmp/a.bin", format="stream")
        chunks = [c async for c in stream]
        assert b"".join(chunks) == blob and len(chunks) > 1
        assert await sb.files.read("/tmp/b.bin", format="bytes") == blob
        with pytest.raises(NotFoundError):
            await sb.files.read("/tmp/missing", format="stream")
        with pytest.raises(ValueError, match="format"):
            await sb.files.read("/tmp/a.bin", format="byte")
    with Sandbox(image, api_url=api) as s2, pytest.raises(NotFoundError):
        s2.files.read("/tmp/missing", format="stream")  # at once, not at first next()


def test_big_writes_signal_names_and_a_timeout_said_as_such(api: str, image: str) -> None:
    with Sandbox(image, api_url=api) as sb:
        # past one piece: whole bytes go in 1 MiB pieces (one body took quadratic time)
        data = os.urandom(3 << 20) + b"tail!"
        assert sb.files.write("/tmp/big", data) == len(data)
        assert sb.files.read("/tmp/big", format="bytes") == data
        p = sb.exec("sleep 30", background=True)
        p.signal("TERM")  # a name, as kill(1) takes it
        assert p.wait().signal == signal.SIGTERM
        with pytest.raises(CommandFailed, match="command timed out and was killed"):
            sb.exec("sleep 5", timeout=1, check=True)


def test_a_sandbox_whose_end_cut_an_exec_reads_as_ended_at_once(api: str, image: str) -> None:
    """The exec's stream said the sandbox ended (its timeout), but info() said `running` for
    ~200 ms more: the record went out before the end was stored."""
    with Sandbox(image, api_url=api, sandbox_timeout=120) as sb:
        sb.set_timeout(3)
        with pytest.raises(SandboxEndedError, match="timeout"):
            sb.exec("sleep 60")
        info = sb.info()
        assert (info["state"], info["end_reason"]) == ("ended", "timeout"), info
