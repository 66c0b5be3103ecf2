"""The console log: what it keeps and what it recognises in what the guest printed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isorun.vmm import console
from isorun.vmm.console import ConsoleLog


async def _pump(tmp_path: Path, *chunks: bytes) -> ConsoleLog:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    halts: list[bool] = []
    log = ConsoleLog(tmp_path / "console.log", on_halt=lambda: halts.append(True))
    log.start(reader)
    await log.drain()
    assert log.halted == bool(halts)
    return log


async def test_a_panic_split_across_reads_is_recognised(tmp_path: Path) -> None:
    log = await _pump(tmp_path, b"[ 0.4] Kernel pa", b"nic - not syncing: No working init found\n")
    assert log.panicked and not log.halted
    assert (tmp_path / "console.log").read_bytes().endswith(b"No working init found\n")


async def test_a_halt_is_recognised_and_ordinary_output_is_neither(tmp_path: Path) -> None:
    halted = await _pump(tmp_path, b"reboot: Sys", b"tem halted\n")
    assert halted.halted and not halted.panicked
    (tmp_path / "console.log").unlink()
    plain = await _pump(tmp_path, b"hello from the guest\n" * 1000)
    assert not plain.halted and not plain.panicked


@pytest.mark.parametrize("first", [270, 70_000], ids=["small-write", "large-write"])
async def test_a_log_that_cannot_be_written_still_sees_the_halt(first: int) -> None:
    # /dev/full fails every write with ENOSPC, as a full state disk does: the log stops,
    # the reading goes on (a halt is seen only there, and an unread console stalls the guest)
    reader = asyncio.StreamReader()
    halts: list[bool] = []
    log = ConsoleLog(Path("/dev/full"), on_halt=lambda: halts.append(True))
    log.start(reader)
    reader.feed_data(b"x" * first)  # ordinary output, read (and failed to log) on its own
    await asyncio.sleep(0.1)
    reader.feed_data(b"reboot: Power down\n")  # the poweroff, later
    reader.feed_eof()
    await log.drain()
    assert log.halted and halts == [True]


async def test_the_file_cap_holds_across_readers_of_one_log(tmp_path: Path) -> None:
    # a VM adopted again (a daemon restart) appends to its log: the cap is the file's
    path = tmp_path / "console.log"
    path.write_bytes(b"o" * (console.FILE_CAP - 10))
    await _pump(tmp_path, b"n" * 100)
    assert path.stat().st_size == console.FILE_CAP
