"""Whether a host device node (/dev/kvm, /dev/vhost-vsock) can really be used."""

from __future__ import annotations

import os
from pathlib import Path


def open_error(path: Path) -> str | None:
    """Why `path` cannot be opened read-write, or None when it can. An access() check is
    not enough: root passes it for any node, and a node with no driver behind it, or one a
    container's device cgroup denies, exists yet cannot be opened."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path} cannot be opened ({exc.strerror or exc})"
    os.close(fd)
    return None
