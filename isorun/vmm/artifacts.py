"""Where the guest kernel and initramfs come from.

Order: an explicit path, then ISORUN_KERNEL / ISORUN_INITRAMFS, then what `make guest`
installed under the cache (default /var/cache/isorun/guest). A user may point at their
own kernel (for instance a PVM-enabled one) this way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from isorun.errors import ConfigError


def cache_root() -> Path:
    return Path(os.environ.get("ISORUN_CACHE", "/var/cache/isorun"))


def _pick(explicit: Path | None, env: str, default_name: str, what: str) -> Path:
    if explicit is not None:
        path = Path(explicit)
        source = "the path given"
    elif os.environ.get(env):
        path = Path(os.environ[env])
        source = f"${env}"
    else:
        path = cache_root() / "guest" / default_name
        source = "the guest cache"
    if not path.is_file():
        raise ConfigError(
            f"guest {what} not found at {path} ({source}): run `make guest` to build it, "
            f"or set {env} to an existing file"
        )
    return path


def kernel_path(explicit: Path | None = None) -> Path:
    return _pick(explicit, "ISORUN_KERNEL", "vmlinux", "kernel")


def initramfs_path(explicit: Path | None = None) -> Path:
    return _pick(explicit, "ISORUN_INITRAMFS", "initramfs.cpio", "initramfs")


def qemu_binary() -> str:
    path = os.environ.get("ISORUN_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise ConfigError(
            "qemu-system-x86_64 not found: install QEMU 10 with "
            "`apt-get install -t bookworm-backports qemu-system-x86` (or set ISORUN_QEMU)"
        )
    return path


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ConfigError(f"`{name}` not found: install it with `apt-get install {package}`")
    return path
