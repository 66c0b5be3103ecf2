"""`isorun shell ID [-- CMD...]`: an interactive terminal in a sandbox.

The local terminal goes into raw mode (so ^C, ^Z and arrow keys reach the sandbox), stdin is
forwarded as it is typed, SIGWINCH resizes the remote terminal, and the command's exit code
becomes ours. Without a terminal on stdin it still works, as a pipe (no raw mode, 24x80).
The terminal's mode is restored on every way out: the end of the command, an error, ^C from
outside raw mode, and SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2/SIGALRM (whose default action
would exit with it still raw). Ending before the remote command (a signal, the terminal
closed, stdout closed, an error) hangs the remote terminal up.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

from isorun.sdk import _core
from isorun.sdk._records import ExecResult
from isorun.sdk.sandbox_sync import Pty, Sandbox

READ_CHUNK = 4096
# Signals whose default action ends the process without unwinding: turned into SystemExit
# (128 + signal, the shell convention) so that the `finally` restoring the terminal runs.
_ENDING_SIGNALS = (
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


def _exit_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _term_size(in_fd: int, out_fd: int) -> tuple[int, int]:
    """The local terminal's size: stdin's, or stdout's when stdin is a pipe."""
    return _size(in_fd if os.isatty(in_fd) else out_fd)


def _size(fd: int) -> tuple[int, int]:
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    if rows < 1 or cols < 1:  # a terminal nobody sized yet
        return 24, 80
    return min(rows, 1000), min(cols, 1000)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        # a terminal closed under us (EIO) has no mode left to restore: its error must
        # not replace the way out (the exit code, and hanging the remote terminal up)
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pump_output(term: Pty, out_fd: int, done: threading.Event, box: list[BaseException]) -> None:
    try:
        for chunk in term:
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view) :]
    except BaseException as exc:  # re-raised in the main thread
        box.append(exc)
    finally:
        done.set()


def run_shell(
    sandbox_id: str,
    cmd: list[str] | None,
    *,
    api_url: str | None,
    api_key: str | None,
    in_fd: int = 0,
    out_fd: int = 1,
) -> int:
    sb = Sandbox.connect(sandbox_id, api_url=api_url, api_key=api_key)
    try:
        rows, cols = _term_size(in_fd, out_fd)
        term = sb.pty(rows, cols, cmd=(cmd if len(cmd) > 1 else cmd[0]) if cmd else None)
        try:
            result = _interact(term, in_fd, out_fd)
        except BaseException:  # a signal, ^C, stdout closed, the terminal gone, an error
            _hang_up(term)
            raise
    finally:
        sb.close()
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 0)


def _hang_up(term: Pty) -> None:
    """We are ending before the remote terminal: hang it up (SIGHUP, as when a terminal
    closes) rather than leave a shell nobody can reach running in the sandbox."""
    sb = term.process.sandbox
    with contextlib.suppress(Exception):
        sb._http.post(
            _core.proc_path(sb.id, term.id, "signal"), json={"signal": signal.SIGHUP}, timeout=5
        )


def _interact(term: Pty, in_fd: int, out_fd: int) -> ExecResult:
    done = threading.Event()
    errors: list[BaseException] = []
    resized = threading.Event()

    def on_winch(signum: int, frame: FrameType | None) -> None:
        resized.set()

    old = signal.signal(signal.SIGWINCH, on_winch)
    old_ending = {s: signal.signal(s, _exit_on) for s in _ENDING_SIGNALS}
    reader = threading.Thread(
        target=_pump_output, args=(term, out_fd, done, errors), name="pty-output", daemon=True
    )
    try:
        with _raw(in_fd):
            reader.start()
            stdin_open = True
            while not done.is_set():
                if resized.is_set():
                    resized.clear()
                    with contextlib.suppress(Exception):  # the process may just have exited
                        term.resize(*_term_size(in_fd, out_fd))
                if not stdin_open:
                    done.wait(0.1)
                    continue
                try:
                    ready, _, _ = select.select([in_fd], [], [], 0.1)
                except InterruptedError:
                    continue
                if not ready:
                    continue
                data = os.read(in_fd, READ_CHUNK)
                try:
                    if data:
                        term.send(data)
                    else:
                        stdin_open = False
                        term.process.close_stdin()  # ^D: most shells then exit
                except Exception:
                    if not done.wait(2.0):  # not just the end of the process racing us
                        raise
            reader.join()
    finally:
        signal.signal(signal.SIGWINCH, old)
        for s, handler in old_ending.items():
            signal.signal(s, handler)
    if errors:
        raise errors[0]
    assert term.result is not None
    return term.result
