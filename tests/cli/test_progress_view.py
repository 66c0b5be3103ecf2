"""The progress line on a terminal stays one line however long the image's name: a line
wider than the terminal wraps, and each redraw (\r, erase line) left a row behind."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios

import pytest

from isorun.cli.progress import ProgressView
from isorun.sdk import PullProgress

pytestmark = pytest.mark.no_tools


def _read_until_the_line_ends(master: int) -> str:
    """All the view wrote: one read(2) of a PTY master returns only what the tty layer has
    passed on so far, which can be the first few redraws."""
    out = b""
    while not out.endswith(b"\n"):
        ready, _, _ = select.select([master], [], [], 10)
        assert ready, f"the view's output stopped before its final newline: {out!r}"
        out += os.read(master, 1 << 16)
    return out.decode()


def test_the_progress_line_is_cut_to_the_terminal_s_width() -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    try:
        with open(slave, "w", closefd=False) as term:
            view = ProgressView(term, tty=True)
            ref = "registry.example.com/a/long/path/of/an/image:with-a-long-tag"
            for done in range(0, 10 << 20, 1 << 20):
                view(PullProgress("pulling", ref, bytes_done=done, bytes_total=10 << 20))
            view.finish()
        out = _read_until_the_line_ends(master)
    finally:
        os.close(master)
        os.close(slave)
    drawn = [d for d in out.replace("\r\n", "\n").split("\r\x1b[K") if d.strip()]
    assert len(drawn) == 10, out
    assert all(len(d.rstrip("\n")) < 40 for d in drawn), drawn
    assert drawn[0].startswith("registry.example.com/a/long/path/of/an"), drawn[0]
