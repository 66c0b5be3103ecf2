"""Apply an image's layers in order into a directory with `umoci raw unpack`.

umoci (Debian-packaged, from the OCI project) handles whiteouts, opaque directories, hard
links, device nodes, xattrs and ownership, and resolves every path and symlink inside the
target root (securejoin), so hostile `../` names and absolute symlinks stay inside it.
`raw unpack` skips the mtree manifest that `umoci unpack` computes by hashing every file.

What umoci writes is bounded by `max_bytes`, because a layer's size says nothing about what
it unpacks to: umoci writes sparse tar entries and zeros densely, so a 10 KB layer declaring
a 1 TB sparse file would fill the host disk. One file is capped by the kernel (RLIMIT_FSIZE
through `prlimit`); the tree as a whole by a watchdog that looks at the filesystem's used
space every 0.05 s, sizes the tree when that grew by more than the limit allows, and kills
umoci once the tree itself is over it. Files are bounded the same way (`max_files`, watching
the filesystem's used inodes): a layer of millions of empty files weighs little once
compressed, and would use up the host filesystem's inodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from pathlib import Path

from isorun.images import proc
from isorun.images.errors import (
    ImageCorruptError,
    ImageError,
    ImageTooLargeError,
    ImageToolError,
    StoreFullError,
    ToolMissingError,
    UnsafeLayerError,
    UnsupportedImageError,
)
from isorun.images.fstree import walk_lstat

POLL_S = 0.05


def _classify(stderr: str) -> ImageError:
    low = stderr.lower()
    detail = proc.tail(stderr, 3)
    if "xattr" in low and "no space left on device" in low:
        # the host filesystem's answer to an extended attribute larger than it holds (ext4:
        # one block), not a full disk: freeing space would not help
        return UnsupportedImageError(
            "a file in the image has extended attributes larger than the host's filesystem "
            f"holds, so the image cannot be stored ({detail})"
        )
    if "entry: .wh..." in low or "/.wh...:" in low:
        return _removed_its_root()
    if "no space left on device" in low or "disk quota exceeded" in low:
        return StoreFullError(
            f"disk full while unpacking layers: free space in the image store and retry ({detail})"
        )
    if "link:" in low and ("no such file" in low or "outside" in low or "escapes" in low):
        return UnsafeLayerError(
            "a layer has a hard link whose target is outside the image "
            "root or does not exist; the image is malformed or hostile and "
            f"was rejected ({detail})"
        )
    if (
        "unexpected eof" in low
        or "invalid header" in low
        or "archive/tar" in low
        or "gzip" in low
        or "digest" in low
        or "checksum" in low
        or "flate" in low
    ):
        return ImageCorruptError(f"a layer is truncated or corrupt; re-push the image ({detail})")
    return ImageToolError(f"umoci could not unpack the image: {detail}")


def _removed_its_root() -> UnsafeLayerError:
    return UnsafeLayerError(
        "a layer removed the directory the image was unpacked into (a whiteout of '..'); "
        "the image is malformed or hostile and was rejected"
    )


def _too_large(what: str, setting: str = "max_image_bytes") -> ImageTooLargeError:
    return ImageTooLargeError(
        f"the image unpacks to {what} (stopped while unpacking); raise {setting} or "
        "use a smaller image"
    )


def tree_usage(path: Path) -> tuple[int, int]:
    """Bytes allocated on disk under `path` and its inodes, the root included (not following
    symlinks; hard links once)."""
    total = inodes = 0
    seen: set[int] = set()
    for _, st in walk_lstat(path):
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        total += st.st_blocks * 512
        inodes += 1
    return total, inodes


def _fs_used(path: Path) -> tuple[int, int]:
    """The filesystem's used bytes and used inodes (0 where it does not count inodes, as
    btrfs: the tree's size is then checked once unpacked)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


async def unpack(
    layout: Path, tag: str, target: Path, *, timeout: float, max_bytes: int, max_files: int
) -> None:
    """Unpack `layout:tag` into `target` (which must not exist yet), writing at most about
    `max_bytes` and `max_files` inodes (ImageTooLargeError past either; the caller removes
    the partial tree)."""
    if os.geteuid() != 0:
        raise ToolMissingError(
            "converting images needs root (to keep ownership and device nodes); run isorund as root"
        )
    proc.which("umoci")
    # umoci takes a whiteout named `.wh..` (of "..") at the top of a layer for the target's
    # parent, and deletes that: the tree is unpacked inside a holder directory of its own,
    # which is all such a layer can reach (umoci then fails), and moved to `target` after.
    holder = target.parent / f".{target.name}.holder"
    holder.mkdir()
    tree = holder / target.name
    argv = [
        "prlimit",
        f"--fsize={max_bytes}",
        "umoci",
        "raw",
        "unpack",
        f"--image={layout}:{tag}",
        str(tree),
    ]
    run = asyncio.ensure_future(proc.run(argv, timeout=timeout))
    try:
        await _watch(run, tree, max_bytes, max_files)
        res = await run
    finally:
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, ImageError):
                await run
    if res.returncode != 0:
        low = res.stderr.lower()
        if res.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "file too large" in low:
            raise _too_large(f"a file larger than the store limit of {max_bytes} bytes")
        raise _classify(res.stderr)
    if not tree.is_dir() or tree.is_symlink():
        raise _removed_its_root()
    os.rename(tree, target)
    holder.rmdir()


async def _watch(
    run: asyncio.Future[proc.Result], target: Path, max_bytes: int, max_files: int
) -> None:
    parent = target.parent
    start = _fs_used(parent)  # statvfs: one cheap syscall, fine on the event loop
    # growth of the filesystem's used space and inodes that calls for a look at the tree
    threshold = (max_bytes, max_files)
    while not run.done():
        await asyncio.wait({run}, timeout=POLL_S)
        if run.done():
            return
        used = _fs_used(parent)
        grown = (used[0] - start[0], used[1] - start[1])
        if grown[0] <= threshold[0] and grown[1] <= threshold[1]:
            continue
        written, inodes = await asyncio.to_thread(tree_usage, target)
        if written > max_bytes:
            raise _too_large(
                f"more than {written} bytes, over the store limit of {max_bytes} bytes"
            )
        if inodes > max_files:
            raise _too_large(
                f"more than {inodes} files and directories, over the store limit of {max_files}",
                "max_image_files",
            )
        # the rest was someone else's writes
        threshold = (grown[0] + max_bytes - written, grown[1] + max_files - inodes)
