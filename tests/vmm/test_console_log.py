"""The console log: what it keeps and what it recognises in what the guest printed."""

from __future__ import annotations

import asyncio
import socket
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


async def test_a_reader_of_an_adopted_vm_keeps_what_it_printed_before(tmp_path: Path) -> None:
    # A daemon restart: the new reader's tail (the sandbox's logs, the console kept at its
    # end) started empty, though the log file held everything printed before.
    await _pump(tmp_path, b"printed before the restart\n")
    after = await _pump(tmp_path, b"and after\n")
    assert after.tail() == "printed before the restart\nand after\n"
    assert (tmp_path / "console.log").read_bytes() == b"printed before the restart\nand after\n"


async def test_the_file_cap_holds_across_readers_of_one_log(tmp_path: Path) -> None:
    # a VM adopted again (a daemon restart) appends to its log: the cap is the file's
    path = tmp_path / "console.log"
    path.write_bytes(b"o" * (console.FILE_CAP - 10))
    await _pump(tmp_path, b"n" * 100)
    assert path.stat().st_size == console.FILE_CAP


async def test_a_console_flood_of_tiny_writes_wakes_the_host_rarely(tmp_path: Path) -> None:
    """QEMU passes a flooding guest's console on 2-3 bytes per write: the pump's pause used
    to leave the socket read into the reader's buffer on every one of them (428,658 reads
    for 10 s of `yes > /dev/console`, half a host core, in no cgroup). Now the socket is
    not read during the pause, so the writes gather in the kernel and the writer waits."""
    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host)
    protocol = writer.transport.get_protocol()
    reads = 0
    data_received = protocol.data_received  # type: ignore[attr-defined]

    def counted(data: bytes) -> None:
        nonlocal reads
        reads += 1
        data_received(data)

    protocol.data_received = counted  # type: ignore[attr-defined]
    log = ConsoleLog(tmp_path / "console.log")
    log.start(reader, writer)
    sent = 0

    def flood() -> None:
        nonlocal sent
        for _ in range(20_000):  # a count, not a time: a busy host writes fewer per second
            sent += guest.send(b"y\r\n")
        guest.sendall(b"END\n")
        guest.close()

    await asyncio.to_thread(flood)
    await log.drain()
    writer.close()
    assert log.tail(4).endswith("END\n")
    assert (tmp_path / "console.log").stat().st_size == min(sent + 4, console.FILE_CAP)
    assert sent == 60_000, f"the flood wrote {sent} bytes"
    assert reads < sent / 3 / 100, f"{reads} socket reads for {sent // 3} writes"
