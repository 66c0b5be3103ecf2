"""A sandbox's scratch disk: a clean empty ext4 of the size asked for, holding the overlay's
upper and work dirs, that costs the host only its metadata until the guest writes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from isorun.vmm import scratch


async def test_a_scratch_disk_is_a_clean_ext4_costing_only_its_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    disk = tmp_path / "scratch.ext4"
    await scratch.make_scratch(disk, 2048)
    assert disk.stat().st_size == 2048 << 20
    # Its inode tables (34 MB at this size) are holes, in the cached template too: a boot's
    # copy does not read them.
    for f in (disk, await scratch.template(2048)):
        assert f.stat().st_blocks * 512 < 4 << 20, f"{f} allocates its zeros"
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    ls = subprocess.run(["debugfs", "-R", "ls -l /", str(disk)], capture_output=True, text=True)
    assert " upper" in ls.stdout and " work" in ls.stdout, ls.stdout


async def test_sandboxes_starting_together_share_one_good_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first creates on an empty cache all want the template at once: each used to make
    # it under the same temporary names, deleting each other's files (and cached a broken
    # one now and then).
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    disks = [tmp_path / f"d{i}.ext4" for i in range(4)]
    await asyncio.gather(*(scratch.make_scratch(d, 256) for d in disks))
    for d in disks:
        fsck = subprocess.run(["e2fsck", "-fn", str(d)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    made = sorted(p.name for p in (tmp_path / "cache" / "scratch").iterdir())
    v = scratch.VERSION
    assert made == [f"empty-256M-v{v}.ext4", f"empty-256M-v{v}.lock"]


async def test_templates_of_older_layouts_and_crashed_makes_leave_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "scratch"
    cache.mkdir(parents=True)
    older = ["empty-256M.ext4", "empty-256M-v2.ext4", "empty-1024M-v3.ext4", "empty-512M-v3.lock"]
    for name in older:
        (cache / name).write_bytes(b"old layout")
    crashed, live = cache / ".make-crashed", cache / ".make-live"
    for work in (crashed, live):
        work.mkdir()
        (work / "mkfs.ext4").write_bytes(b"half made")
    two_days_ago = time.time() - 2 * 86400
    os.utime(crashed, (two_days_ago, two_days_ago))
    (cache / "notes.txt").write_text("not ours")

    await scratch.make_scratch(tmp_path / "d.ext4", 256)

    left = sorted(p.name for p in cache.iterdir())
    v = scratch.VERSION
    assert left == [".make-live", f"empty-256M-v{v}.ext4", f"empty-256M-v{v}.lock", "notes.txt"]


async def test_a_template_a_crash_left_empty_is_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a crash right after an unsynced rename can leave: the name on an empty file. It
    # was trusted because it existed, and every VM of that size got a 0-byte scratch disk.
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "scratch"
    cache.mkdir(parents=True)
    (cache / f"empty-256M-v{scratch.VERSION}.ext4").write_bytes(b"")
    disk = tmp_path / "d.ext4"
    await scratch.make_scratch(disk, 256)
    assert disk.stat().st_size == 256 << 20
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


async def test_a_huge_scratch_disk_is_made_without_writing_its_inode_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Zeroing a 1 TiB disk's inode tables in mkfs took 16 GiB of the host's ext4 (as
    # unwritten extents) before they were punched out: a few such creates at once could
    # fill its disk. Here the host's cache is an ext4 of 1 GiB.
    small, backing = tmp_path / "small", tmp_path / "small.ext4"
    small.mkdir()
    subprocess.run(["mkfs.ext4", "-q", str(backing), "1G"], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(small)], check=True)
    try:
        monkeypatch.setenv("ISORUN_CACHE", str(small / "cache"))
        disk = small / "scratch.ext4"
        await scratch.make_scratch(disk, 1 << 20)
        assert disk.stat().st_size == 1 << 40
        assert disk.stat().st_blocks * 512 < 64 << 20
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_a_template_left_idle_goes_when_another_size_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One template per size asked for: sizes a tenant cycles through stayed for good.
    monkeypatch.setenv("ISORUN_CACHE", str(tmp_path / "cache"))
    used, idle = await scratch.template(256), await scratch.template(512)
    two_days_ago = time.time() - 2 * 86400
    os.utime(idle, (two_days_ago, two_days_ago))
    os.utime(used, (two_days_ago, two_days_ago))
    await scratch.make_scratch(tmp_path / "d.ext4", 256)  # a use: no longer idle
    await scratch.make_scratch(tmp_path / "e.ext4", 300)
    v = scratch.VERSION
    left = sorted(p.name for p in (tmp_path / "cache" / "scratch").iterdir())
    assert left == [
        f"empty-256M-v{v}.ext4",
        f"empty-256M-v{v}.lock",
        f"empty-300M-v{v}.ext4",
        f"empty-300M-v{v}.lock",
    ]
