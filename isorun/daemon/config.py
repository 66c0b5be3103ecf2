"""Daemon settings: defaults, then environment (ISORUN_*), then command-line flags."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from isorun.errors import ConfigError
from isorun.images import RegistryPolicy
from isorun.vmm import artifacts

DEFAULT_SOCKET = Path("/run/isorun/isorund.sock")
MIN_MEMORY_MIB = 128  # a create's memory_mib may be no less (models.CreateSandbox)


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
    # The stdin of foreground execs the daemon holds at most, all sandboxes together, until
    # their commands read it (a command is fed only as fast as it reads): past it, 503.
    held_stdin_mib: int = field(default_factory=lambda: _env_int("ISORUN_HELD_STDIN_MIB", 256))
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
        # Checked at start: a value out of range (nan, inf, 0, negative) was taken without
        # a word, then failed every create or every end (a NaN cost is no SQL value).
        _in_range("stream_keepalive_s", self.stream_keepalive_s, 0.01, 3600, "seconds")
        _in_range("cpu_overcommit", self.cpu_overcommit, 0.01, 1000)
        _in_range("mem_overcommit", self.mem_overcommit, 0.01, 1000)
        _in_range("price_per_vcpu_hour", self.price_per_vcpu_hour, 0, 1e6, "per vCPU-hour")
        _in_range("default_timeout_s", self.default_timeout_s, 1, self.max_timeout_s, "seconds")
        _in_range("default_memory_mib", self.default_memory_mib, MIN_MEMORY_MIB, 256 * 1024, "MiB")
        _in_range("held_stdin_mib", self.held_stdin_mib, 1, 1 << 20, "MiB")
        if int(self.host_cpus * self.cpu_overcommit) < 1:
            raise ConfigError(
                f"{_setting('cpu_overcommit')} = {_num(self.cpu_overcommit)} leaves no vCPU for "
                f"sandboxes on this host's {self.host_cpus} CPUs"
            )
        if int(self.host_mem_mib * self.mem_overcommit) < MIN_MEMORY_MIB:
            raise ConfigError(
                f"{_setting('mem_overcommit')} = {_num(self.mem_overcommit)} leaves no room for a "
                f"sandbox ({MIN_MEMORY_MIB} MiB at least) in this host's {self.host_mem_mib} MiB"
            )

    @property
    def db_path(self) -> Path:
        return self.state_dir / "isorund.db"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"


# Where each checked setting comes from, for the message that names it.
_SOURCES = {
    "stream_keepalive_s": "ISORUN_STREAM_KEEPALIVE_S",
    "cpu_overcommit": "ISORUN_CPU_OVERCOMMIT or --cpu-overcommit",
    "mem_overcommit": "ISORUN_MEM_OVERCOMMIT or --mem-overcommit",
    "price_per_vcpu_hour": "ISORUN_PRICE_PER_VCPU_HOUR or --price-per-vcpu-hour",
    "default_timeout_s": "ISORUN_DEFAULT_TIMEOUT",
    "default_memory_mib": "ISORUN_DEFAULT_MEMORY_MIB",
    "held_stdin_mib": "ISORUN_HELD_STDIN_MIB",
}


def _setting(name: str) -> str:
    return f"{name} ({_SOURCES[name]})"


def _in_range(name: str, value: float, low: float, high: float, unit: str = "") -> None:
    """Refuse a setting that is not a finite number from `low` to `high`."""
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(
            f"{_setting(name)} = {_num(value)} must be a number from {_num(low)} to "
            f"{_num(high)}" + (f" {unit}" if unit else "")
        )


def _num(v: float) -> str:
    """As the operator would write it: 3000000, not 3e+06; 4, not 4.0."""
    return str(int(v)) if math.isfinite(v) and v == int(v) else str(v)


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024
