"""Drawing pull/build/boot progress: one carriage-return line on a terminal, one line per
phase elsewhere, JSON lines with --json. No dependency beyond the standard library."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import TextIO

from isorun.sdk import PullProgress

_LABEL = {
    "resolving": "resolving",
    "pulling": "pulling",
    "unpacking": "unpacking layers",
    "building": "building (mmdebstrap)",
    "converting": "writing ext4",
    "waiting": "waiting for another pull",
    "cached": "cached",
    "done": "ready",
    "booting": "booting VM",
}


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def describe(ev: PullProgress, elapsed: float) -> str:
    text = f"{ev.ref}: {_LABEL.get(ev.phase, ev.phase)}"
    if ev.phase == "pulling" and ev.bytes_total:
        done = ev.bytes_done or 0
        pct = 100 * done // ev.bytes_total
        width = 20
        fill = width * done // ev.bytes_total
        bar = "#" * fill + "-" * (width - fill)
        text += f" [{bar}] {human(done)}/{human(ev.bytes_total)} {pct}%"
    elif ev.phase == "done" and ev.digest:
        text += f" {ev.digest[:19]}"
    return f"{text} ({elapsed:.1f}s)"


class ProgressView:
    """A `PullProgress` callback. tty: redraw one line in place; else one line per phase."""

    def __init__(self, stream: TextIO, *, tty: bool, json_lines: bool = False) -> None:
        self.stream = stream
        self.tty = tty
        self.json_lines = json_lines
        self.started = time.monotonic()
        self._last_phase = ""
        self._open = False  # a tty line is drawn and not ended yet

    def __call__(self, ev: PullProgress) -> None:
        if self.json_lines:
            rec = {"type": "progress", **{k: v for k, v in asdict(ev).items() if v is not None}}
            self.stream.write(json.dumps(rec) + "\n")
        elif self.tty:
            # cut to the terminal's width: a line that wraps leaves a row behind at every
            # redraw (\r and erase-line reach only the row the cursor is on)
            line = describe(ev, time.monotonic() - self.started)
            if (columns := self._columns()) > 1:
                line = line[: columns - 1]
            self.stream.write("\r\x1b[K" + line)
            self._open = True
        elif ev.phase != self._last_phase:
            self.stream.write(describe(ev, time.monotonic() - self.started) + "\n")
        self._last_phase = ev.phase
        self.stream.flush()

    def _columns(self) -> int:
        """The terminal's width; 0 when not known (a terminal nobody sized: not cut)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):  # not a real terminal's stream
            return 0

    def finish(self) -> None:
        """End the in-place line (call before printing anything else)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
