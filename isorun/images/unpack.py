"""Apply an image's layers in order into a directory with `umoci raw unpack`.

umoci (Debian-packaged, from the OCI project) handles whiteouts, opaque directories, hard
links, device nodes, xattrs and ownership, and resolves every path and symlink inside the
target root (securejoin), so hostile `../` names and absolute symlinks stay inside it.
`raw unpack` skips the mtree manifest that `umoci unpack` computes by hashing every file.
"""

from __future__ import annotations

import os
from pathlib import Path

from isorun.images import proc
from isorun.images.errors import (
    ImageCorruptError,
    ImageError,
    ImageToolError,
    StoreFullError,
    ToolMissingError,
    UnsafeLayerError,
)


def _classify(stderr: str) -> ImageError:
    low = stderr.lower()
    detail = proc.tail(stderr, 3)
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


async def unpack(layout: Path, tag: str, target: Path, *, timeout: float) -> None:
    """Unpack `layout:tag` into `target` (which must not exist yet)."""
    if os.geteuid() != 0:
        raise ToolMissingError(
            "converting images needs root (to keep ownership and device nodes); run isorund as root"
        )
    res = await proc.run(
        ["umoci", "raw", "unpack", f"--image={layout}:{tag}", str(target)], timeout=timeout
    )
    if res.returncode != 0:
        raise _classify(res.stderr)
