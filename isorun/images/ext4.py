"""Turn a directory tree into an ext4 image file with `mkfs.ext4 -d`."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from isorun.images import proc
from isorun.images.errors import ImageToolError, StoreFullError, UnsupportedImageError

BLOCK = 4096
MiB = 1 << 20
HEADROOM_FRACTION = 0.10
HEADROOM_FIXED = 16 * MiB
# mkfs.ext4 -d recurses per directory level and crashes at about 1020 (e2fsprogs 1.47)
MAX_DEPTH = 512
# mkfs.ext4 -d links each entry into an unindexed directory, scanning it: its time grows as
# the square of a directory's entries (20,000 in one: 35 s, 40,000: 127 s here), and of the
# hard-linked inodes (a list it searches per link: 40,000: 3 s). A few hundred KB of layer
# could hold the host's CPU until the pull's timeout: the sum of the squares is bounded.
MAX_DIR_WORK = 40_000**2
MAX_HARD_LINKED = 250_000


@dataclass(frozen=True)
class TreeSize:
    data_bytes: int  # bytes of blocks the content needs (files, dirs, long symlinks)
    inodes: int  # distinct inodes (hard links counted once)

    def image_bytes(self) -> int:
        meta = self.inodes * 256 + (self.data_bytes // BLOCK) * 8
        total = int((self.data_bytes + meta) * (1 + HEADROOM_FRACTION)) + HEADROOM_FIXED
        return -(-total // MiB) * MiB


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def measure(root: Path) -> TreeSize:
    """Walk `root` without following symlinks and estimate what ext4 needs for it."""
    seen: set[int] = set()
    data = BLOCK
    inodes = 1
    dir_work = 0  # the sum over directories of their entries squared
    largest = (0, "")
    stack = [(str(root), 0)]
    while stack:
        path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnsupportedImageError(
                f"the image's tree is more than {MAX_DEPTH} directories deep (at "
                f"{os.path.relpath(path, root)[:200]}...); mkfs.ext4 cannot copy trees that "
                "deep, so the image was refused"
            )
        entries = 0
        with os.scandir(path) as it:
            for e in it:
                entries += 1
                st = e.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    data += max(BLOCK, _blocks(st.st_size))
                    stack.append((e.path, depth + 1))
                elif stat.S_ISREG(st.st_mode):
                    # one extra block per large file for extent tree nodes
                    data += _blocks(st.st_size) + (BLOCK if st.st_size > 48 * BLOCK else 0)
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                    data += BLOCK
                if _xattr_bytes(e.path) > IN_INODE_XATTR_BYTES:
                    data += BLOCK
        dir_work += entries * entries
        largest = max(largest, (entries, path))
        if dir_work > MAX_DIR_WORK:
            raise UnsupportedImageError(
                "the image's directories hold too many entries each for mkfs.ext4, whose time "
                f"grows as their square (the largest: {os.path.relpath(largest[1], root)[:200]}"
                f" with {largest[0]:,}; about {int(MAX_DIR_WORK**0.5):,} in one directory is "
                "the most); spread the files over subdirectories"
            )
    if len(seen) > MAX_HARD_LINKED:
        raise UnsupportedImageError(
            f"the image has {len(seen):,} hard-linked files, over the {MAX_HARD_LINKED:,} "
            "mkfs.ext4 copies in a bounded time"
        )
    return TreeSize(data, inodes)


# What a 256-byte inode holds of extended attributes itself (256 - 128 - 32 bytes of extra
# fields - its 4-byte header); more takes the inode a block of its own.
IN_INODE_XATTR_BYTES = 92
XATTR_ENTRY_BYTES = 16  # an entry's header; its name (without prefix) and value follow


def _xattr_bytes(path: str) -> int:
    """Roughly what `path`'s extended attributes take in ext4 (an image's files may carry
    large ones, e.g. signatures: each then needs a block the size estimate must count)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return 0
    total = 0
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        total += XATTR_ENTRY_BYTES + _round4(len(name.partition(".")[2])) + _round4(len(value))
    return total


def _round4(n: int) -> int:
    return -(-n // 4) * 4


async def make_ext4(tree: Path, out: Path, size: TreeSize, *, timeout: float) -> int:
    """Write `tree` into a new sparse ext4 image `out`; returns the image size in bytes."""
    image_bytes = size.image_bytes()
    inodes = int(size.inodes * 1.2) + 1024
    for attempt in range(3):
        out.unlink(missing_ok=True)
        res = await proc.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                str(BLOCK),
                "-m",
                "0",
                "-N",
                str(inodes),
                "-O",
                "^has_journal,^resize_inode",
                "-L",
                "isorun-rootfs",
                "-E",
                "lazy_itable_init=0,root_owner=0:0",
                "-d",
                str(tree),
                str(out),
                f"{image_bytes // 1024}k",
            ],
            timeout=timeout,
        )
        if res.returncode == 0:
            await asyncio.to_thread(os.chmod, out, 0o444)
            return image_bytes
        low = res.stderr.lower()
        if (
            "no space left on device" in low
            and "could not allocate" not in low
            and "filesystem" not in low
        ):
            raise StoreFullError(
                "disk full while writing the ext4 image: free space in the "
                f"image store and retry ({proc.tail(res.stderr, 2)})"
            )
        if attempt < 2 and (
            "could not allocate" in low
            or "no free space" in low
            or "no space left" in low
            or "inode" in low
        ):
            image_bytes = int(image_bytes * 1.5)
            inodes = int(inodes * 1.5)
            continue
        break
    out.unlink(missing_ok=True)
    raise ImageToolError(f"mkfs.ext4 failed: {proc.tail(res.stderr, 3)}")
