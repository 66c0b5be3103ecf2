"""Daemon settings: defaults, then environment (ISORUN_*), then command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from isorun.errors import ConfigError
from isorun.images import RegistryPolicy
from isorun.vmm import artifacts

DEFAULT_SOCKET = Path("/run/isorun/isorund.sock")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None


def default_socket() -> Path:
    return Path(os.environ.get("ISORUN_SOCKET", str(DEFAULT_SOCKET)))


def tenant_registries(
    text: str | None = None, setting: str = "ISORUN_TENANT_REGISTRIES"
) -> RegistryPolicy:
    """The registries an API-key tenant may have the daemon pull from (images/registry_policy.py):
    by default any on a public address, anonymously; the local administrator is not limited."""
    if text is None:
        text = os.environ.get("ISORUN_TENANT_REGISTRIES", "public")
    return RegistryPolicy.parse(text, setting)


def default_state_dir() -> Path:
    return Path(os.environ.get("ISORUN_STATE_DIR", "/var/lib/isorun"))


@dataclass
class DaemonConfig:
    state_dir: Path = field(default_factory=default_state_dir)
    socket_path: Path = field(default_factory=default_socket)
    tcp: str | None = field(default_factory=lambda: os.environ.get("ISORUN_TCP") or None)
    image_dir: Path = field(
        default_factory=lambda: Path(
            os.environ.get("ISORUN_IMAGE_DIR", str(artifacts.cache_root() / "images"))
        )
    )
    # Oversubscription: the sum over live sandboxes may reach host capacity x ratio.
    cpu_overcommit: float = field(default_factory=lambda: _env_float("ISORUN_CPU_OVERCOMMIT", 4.0))
    mem_overcommit: float = field(default_factory=lambda: _env_float("ISORUN_MEM_OVERCOMMIT", 1.5))
    price_per_vcpu_hour: float = field(
        default_factory=lambda: _env_float("ISORUN_PRICE_PER_VCPU_HOUR", 0.041)
    )
    default_vcpus: int = 1
    default_memory_mib: int = field(
        default_factory=lambda: _env_int("ISORUN_DEFAULT_MEMORY_MIB", 1024)
    )
    default_disk_mib: int = 2048
    default_timeout_s: int = field(default_factory=lambda: _env_int("ISORUN_DEFAULT_TIMEOUT", 300))
    max_timeout_s: int = 30 * 86400
    reaper_interval_s: float = 1.0
    # An NDJSON stream silent this long carries a keepalive record (daemon/keepalive.py).
    stream_keepalive_s: float = field(
        default_factory=lambda: _env_float("ISORUN_STREAM_KEEPALIVE_S", 15.0)
    )
    jail: bool = field(default_factory=lambda: os.environ.get("ISORUN_JAIL", "1") != "0")
    # Start sandboxes from a booted template of their machine shape (isorun/vmm/warm.py).
    warm_start: bool = field(
        default_factory=lambda: os.environ.get("ISORUN_WARM_START", "1") != "0"
    )
    # `rootfs:/path.ext4` images: a host path as a VM disk. Local (unix socket) callers only,
    # and only when switched on (tests, custom guest images).
    allow_raw_rootfs: bool = field(
        default_factory=lambda: os.environ.get("ISORUN_ALLOW_RAW_ROOTFS") == "1"
    )
    tenant_registries: RegistryPolicy = field(default_factory=tenant_registries)
    # What a graceful stop does with running sandboxes: keep them (re-adopted on restart).
    kill_on_exit: bool = False
    host_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    host_mem_mib: int = field(default_factory=lambda: _mem_total_mib())

    def __post_init__(self) -> None:
        if not 0.01 <= self.stream_keepalive_s <= 3600:
            raise ConfigError(
                f"stream_keepalive_s (ISORUN_STREAM_KEEPALIVE_S) = {self.stream_keepalive_s:g} "
                "must be between 0.01 and 3600 seconds"
            )

    @property
    def db_path(self) -> Path:
        return self.state_dir / "isorund.db"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024
