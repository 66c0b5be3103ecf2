"""`isorun shell` driven through a real pseudo-terminal: raw mode, keystrokes, SIGWINCH ->
resize, exit code, against a real daemon and guest."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from daemonhelpers import Daemon

pytestmark = pytest.mark.vm


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _spawn_shell(
    sid: str, tty: int, daemon: Daemon, controlling: bool = False
) -> subprocess.Popen[bytes]:
    """`isorun shell sid` on the terminal whose slave end is tty, in its own session (of
    which, with `controlling`, tty is the controlling terminal, as a terminal window's)."""

    def take_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return subprocess.Popen(
        [sys.executable, "-m", "isorun.cli", "shell", sid],
        stdin=tty,
        stdout=tty,
        stderr=tty,
        env=daemon.env,
        start_new_session=True,
        preexec_fn=take_tty if controlling else None,
    )


def _read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 30) -> None:
    assert _read_for(fd, needle, buf, timeout), f"{needle!r} not seen in {bytes(buf)[-500:]!r}"


def _read_for(fd: int, needle: bytes, buf: bytearray, timeout: float) -> bool:
    """Read into buf until needle is in it (True) or timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {needle!r}: {bytes(buf)[-500:]!r}"
            buf += chunk
    return True


def test_shell_raw_mode_resize_and_exit_code(daemon: Daemon, image: str) -> None:
    with daemon.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
    master, slave = os.openpty()
    _set_size(slave, 33, 101)
    child = _spawn_shell(sid, slave, daemon)
    os.close(slave)
    buf = bytearray()
    try:
        # Type once the shell is there, as a person would; busybox ash asks the terminal
        # where the cursor is (ESC[6n) and we answer like a terminal emulator.
        _read_until(master, b"\x1b[6n", buf)
        os.write(master, b"\x1b[1;1R")
        os.write(master, b"stty size\n")
        _read_until(master, b"33 101", buf)
        # Raw mode: ^C goes to the sandbox (interrupting sleep there), not to our CLI.
        os.write(master, b"echo sle''eping; sleep 100\n")
        _read_until(master, b"sleeping", buf)
        # "sleeping" shows before ash has made sleep the terminal's foreground group; a ^C in
        # that gap reaches only ash, which then waits the 100 s out. Press again, as a person
        # would, until the prompt is back.
        after = bytearray()
        for _ in range(20):
            os.write(master, b"\x03")
            if _read_for(master, b"/ # ", after, timeout=1.5):
                break
        buf += after
        assert b"/ # " in after, f"^C did not interrupt sleep: {bytes(buf)[-300:]!r}"
        os.write(master, b"echo ali''ve\n")
        _read_until(master, b"alive", buf)
        assert child.poll() is None
        # SIGWINCH -> the remote terminal is resized.
        _set_size(master, 45, 132)
        os.kill(child.pid, signal.SIGWINCH)
        # The resize travels CLI -> daemon -> guest while we type: ask until it has landed.
        for _ in range(30):
            os.write(master, b"stty size\n")
            if _read_for(master, b"45 132", buf, timeout=1):
                break
        assert b"45 132" in buf, f"never resized: {bytes(buf)[-300:]!r}"
        os.write(master, b"exit 7\n")
        assert child.wait(60) == 7
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        with daemon.client() as c:
            c.delete(f"/v1/sandboxes/{sid}")


def test_shell_restores_the_terminal_when_signalled(daemon: Daemon, image: str) -> None:
    """SIGTERM / SIGHUP / SIGQUIT (default action: die on the spot) end `isorun shell` with
    128 + the signal, its terminal back in the mode it had, and the remote shell hung up;
    so does its terminal window closing (it left the remote shell running: restoring the
    mode of a closed terminal failed, and that error replaced the hang-up)."""
    with daemon.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            master, slave = os.openpty()
            before = termios.tcgetattr(slave)  # we keep the slave open to look at its mode
            child = _spawn_shell(sid, slave, daemon)
            buf = bytearray()
            try:
                _read_until(master, b"\x1b[6n", buf)  # the shell is up: we are in raw mode
                assert not termios.tcgetattr(slave)[3] & termios.ICANON
                child.send_signal(sig)
                assert child.wait(60) == 128 + sig
                assert termios.tcgetattr(slave) == before
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                os.close(master)
                os.close(slave)
        master, slave = os.openpty()
        child = _spawn_shell(sid, slave, daemon, controlling=True)
        os.close(slave)
        try:
            _read_until(master, b"\x1b[6n", bytearray())
            os.close(master)  # the window closes: the kernel hangs its session up
            assert child.wait(60) == 128 + signal.SIGHUP
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        deadline = time.monotonic() + 30
        with daemon.client() as c:
            while True:
                procs = c.get(f"/v1/sandboxes/{sid}/processes").json()["processes"]
                running = [p["proc_id"] for p in procs if p["running"]]
                if not running or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert running == []
    finally:
        with daemon.client() as c:
            c.delete(f"/v1/sandboxes/{sid}")


def test_shell_with_piped_stdin_resizes_to_stdout_s_terminal(daemon: Daemon, image: str) -> None:
    """Stdin a pipe, stdout a terminal: the remote terminal starts at stdout's size, and a
    SIGWINCH resized it to 24x80 (it asked stdin, which has no size)."""
    with daemon.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
    master, slave = os.openpty()
    _set_size(slave, 40, 120)
    cmd = (
        "stty size; while sleep 0.2; do s=$(stty size); [ \"$s\" = '40 120' ] || break; done;"
        " echo now $s"
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "isorun.cli", "shell", sid, "--", "sh", "-c", cmd],
        stdin=subprocess.PIPE,
        stdout=slave,
        stderr=slave,
        env=daemon.env,
        start_new_session=True,
    )
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, b"40 120", buf)
        _set_size(master, 50, 150)
        os.kill(child.pid, signal.SIGWINCH)
        _read_until(master, b"now ", buf)
        _read_until(master, b"\n", buf)
        assert b"now 50 150" in buf, bytes(buf)[-200:]
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        with daemon.client() as c:
            c.delete(f"/v1/sandboxes/{sid}")
