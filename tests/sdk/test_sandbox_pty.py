"""SDK stdin and PTY handles (sync and async faces) against a real daemon and guest."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from numbered import numbered, numbered_cmd

from isorun import AsyncSandbox, NotFoundError, Sandbox
from isorun.errors import IsorunError

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sb(api: str, image: str) -> Iterator[Sandbox]:
    with Sandbox(image, api_url=api, sandbox_timeout=600) as s:
        yield s


def test_process_send_and_close_stdin(sb: Sandbox) -> None:
    p = sb.exec("cat; echo end", background=True, stdin=True)
    p.send_stdin("one\n")
    p.send_stdin(b"two\n")
    p.close_stdin()
    r = p.wait()
    assert (r.stdout, r.exit_code) == ("one\ntwo\nend\n", 0)
    # Initial bytes at start, then more; a send larger than one request is split.
    big = b"x" * ((1 << 20) + 5000)
    q = sb.exec("wc -c", background=True, stdin=b"ab")
    q.send_stdin(big)
    q.close_stdin()
    assert q.wait().stdout.strip() == str(len(big) + 2)
    with pytest.raises(IsorunError, match="open_stdin"):
        sb.exec("sleep 5", background=True).send_stdin("x")
    with pytest.raises(ValueError, match="background"):
        sb.exec("cat", stdin=True)


def test_sync_pty(sb: Sandbox) -> None:
    seen: list[bytes] = []
    t = sb.pty(rows=30, cols=100, on_data=seen.append)
    assert repr(t) == f"<Pty {t.id} pid={t.pid} sandbox={sb.id}>"
    t.send("stty size\n")
    out = b""
    for chunk in t:
        out += chunk
        if b"30 100" in out:
            break
    t.resize(40, 120)
    t.send(b"stty size; exit 4\n")
    r = t.wait()
    assert r.exit_code == 4
    assert b"40 120" in b"".join(seen)
    assert b"30 100" not in b"".join(seen)  # wait() went on from where iteration stopped
    with pytest.raises(IsorunError, match="exited"):
        t.resize(10, 10)
    with pytest.raises(IsorunError, match="no terminal"):
        sb.exec("sleep 5", background=True).resize(10, 10)
    with pytest.raises(NotFoundError):
        sb.processes.connect("p424242")


async def test_async_pty_and_stdin(sb: Sandbox, api: str) -> None:
    asb = await AsyncSandbox.connect(sb.id, api_url=api)
    try:
        got: list[bytes] = []

        async def on_data(b: bytes) -> None:
            got.append(b)

        t = await asb.pty(cmd=["sh"], on_data=on_data)
        assert repr(t) == f"<AsyncPty {t.id} pid={t.pid} sandbox={asb.id}>"
        await t.resize(12, 34)
        await t.send("stty size; exit 0\n")
        assert (await t.wait()).exit_code == 0
        assert b"12 34" in b"".join(got)
        p = await asb.exec("cat", background=True, stdin=True)
        await p.send_stdin("async\n")
        await p.close_stdin()
        assert (await p.wait()).stdout == "async\n"
    finally:
        await asb.close()


def test_sync_pty_refuses_an_async_on_data(sb: Sandbox) -> None:
    """An `async def` on_data used to be called and its coroutine dropped: no output, no
    error, only a RuntimeWarning. It raises as every other sync callback does."""
    got: list[bytes] = []

    async def on_data(b: bytes) -> None:
        got.append(b)

    t = sb.pty(cmd=["sh", "-c", "echo hello"], on_data=on_data)
    with pytest.raises(TypeError, match=r"on_data returned an awaitable.*AsyncSandbox"):
        t.wait()
    assert got == []


def test_a_pty_resumed_after_a_gap_goes_on_where_it_stopped(sb: Sandbox) -> None:
    """A reader that fell behind a PTY's ring skipped ahead (a gap), but the stream never
    said so mid-way: `Pty.offset` lagged the true position by the gap, so the next `for
    chunk in pty` replayed output already delivered. The daemon's `gap` record moves it."""
    total = 1_600_000  # past the ring (1 MiB): a gap
    # through cat: awk writes each 10-byte record to a terminal on its own (the agent
    # gathers those, but cat's 4 KiB writes are still cheaper for the guest's tty layer)
    t = sb.pty(cmd=["sh", "-c", numbered_cmd(total) + " | cat"])
    end, gaps = 0, 0

    def check(chunk: bytes) -> None:
        """`chunk` is the output just before `t.offset`, and nothing already delivered."""
        nonlocal end, gaps
        start = t.offset - len(chunk)
        assert chunk == numbered(start, len(chunk)), f"bytes not where offset {start} says"
        assert start >= end, f"output replayed: {start} < {end}"
        gaps += start > end
        end = t.offset

    for chunk in t:
        check(chunk)
        if end < 100_000:  # fall behind: let the process write all of it first
            while any(p.running for p in sb.processes.list() if p.proc_id == t.id):
                time.sleep(0.2)
        elif gaps:
            break  # past the gap: the second pass resumes from here
    else:
        pytest.fail("no gap: the reader never fell behind")
    for chunk in t:
        check(chunk)
    assert t.result is not None and t.result.exit_code == 0
    assert end == t.offset == total
