"""Finding the daemon the SDK talks to (its URL, socket and key, from arguments or the
environment), and starting one on the local socket when nothing answers there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from isorun.errors import ConfigError
from isorun.sdk.errors import (
    DaemonUnavailable,
)

DEFAULT_SOCKET = "/run/isorun/isorund.sock"


@dataclass
class Settings:
    base_url: str
    uds: str | None
    api_key: str | None
    autostart: bool

    def headers(self) -> dict[str, str]:
        h = {"user-agent": "isorun-python/0.1"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h


def resolve(api_url: str | None, api_key: str | None, autostart: bool | None) -> Settings:
    """Arguments, then ISORUN_API_URL / ISORUN_API_KEY, then the local unix-socket daemon."""
    url = api_url or os.environ.get("ISORUN_API_URL")
    key = api_key or os.environ.get("ISORUN_API_KEY") or None
    if autostart is None:
        autostart = os.environ.get("ISORUN_AUTOSTART", "1") not in ("0", "false", "no")
    if url is None or url.startswith("unix:"):
        sock = (
            url[len("unix:") :].lstrip() if url else os.environ.get("ISORUN_SOCKET", DEFAULT_SOCKET)
        )
        if sock.startswith("//"):
            sock = sock[2:]
        # Only the embedded default is started automatically, never a remote daemon.
        return Settings("http://isorund", sock, key, autostart)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # else httpx's "unsupported protocol" came back as a lost connection to the daemon
        raise ConfigError(
            f"API URL {url!r} (api_url, --api-url or ISORUN_API_URL) is not an isorun API "
            "address: give http://HOST:PORT, https://HOST, or unix:/path/to/isorund.sock"
        )
    return Settings(url.rstrip("/"), None, key, False)


# What a user who may not use the local socket can do instead.
_NOT_ROOT_WAYS = (
    "run this as root, or use a daemon that also serves TCP (root starts it with "
    "`isorund --tcp 127.0.0.1:8181` or ISORUN_TCP, and makes you a key with `isorun keys "
    "create`): set ISORUN_API_URL=http://127.0.0.1:8181 and ISORUN_API_KEY=isr_... (or pass "
    "api_url= and api_key=)"
)


def ensure_daemon(s: Settings, timeout: float = 30.0) -> None:
    """Start `isorund` on the unix socket when nothing answers there (set
    ISORUN_AUTOSTART=0 or pass autostart=False to switch this off)."""
    if s.uds is None or _answers(s.uds):
        return
    if (denied := _denied(s.uds)) is not None:
        # A daemon serves there, but its socket (0600) is root's: starting another would
        # only fail, and on a file this user may not write.
        raise DaemonUnavailable(
            f"you may not connect to the isorun daemon's socket {s.uds} ({denied.strerror}; "
            f"uid {os.geteuid()}): the local daemon runs as root and its socket is root's "
            f"alone. To use it, {_NOT_ROOT_WAYS}"
        )
    if not s.autostart:
        raise DaemonUnavailable(
            f"no isorun daemon answers on {s.uds}: start one with `isorund` (or `isorun "
            "daemon`), or enable auto-start (ISORUN_AUTOSTART=1)"
        )
    state = Path(os.environ.get("ISORUN_STATE_DIR", "/var/lib/isorun")).absolute()
    env = _daemon_env(s.uds, state)
    log_path = state / "isorund.log"
    try:
        # its database holds sandboxes' env (secrets) and consoles: root's alone
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log_start = log.tell()  # what this daemon writes comes after
            # The daemon runs as root: -P and cwd="/" keep the caller's directory (which
            # another user may write to, and plant a uvicorn.py in) off its sys.path.
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "isorun.daemon"],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        raise _cannot_start(s.uds, exc) from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(s.uds):
            return
        if proc.poll() is not None:
            if _answers(s.uds):  # it lost a start-up race to another daemon, which serves
                return
            raise DaemonUnavailable(
                f"started isorund but it exited (status {proc.returncode}) before it answered "
                f"on {s.uds}; the end of {log_path}:\n{_log_tail(log_path, log_start)}"
            )
        time.sleep(0.05)
    raise DaemonUnavailable(
        f"started isorund but it did not answer on {s.uds} within {timeout:.0f}s; see {log_path}"
    )


# Settings naming files that the daemon, started in "/", must be given as absolute paths
# to mean what they mean in the caller's directory (ISORUN_QEMU may also be a bare name).
_PATH_SETTINGS = ("ISORUN_CACHE", "ISORUN_IMAGE_DIR", "ISORUN_KERNEL", "ISORUN_INITRAMFS")


def _daemon_env(uds: str, state: Path) -> dict[str, str]:
    """The environment of an auto-started daemon: the caller's, with its paths absolute."""
    env = dict(os.environ, ISORUN_SOCKET=os.path.abspath(uds), ISORUN_STATE_DIR=str(state))
    for name in _PATH_SETTINGS:
        if env.get(name):
            env[name] = os.path.abspath(env[name])
    qemu = env.get("ISORUN_QEMU")
    if qemu and "/" in qemu:
        env["ISORUN_QEMU"] = os.path.abspath(qemu)
    return env


def _denied(uds: str) -> PermissionError | None:
    """The PermissionError connecting to `uds` raises: a socket (or a directory on its
    path) that belongs to another user, root's daemon's for a non-root caller."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(uds)
        except PermissionError as exc:
            return exc
        except OSError:
            return None
    return None


def _cannot_start(uds: str, exc: OSError) -> DaemonUnavailable:
    """Auto-start could not make the state dir, open the log or run the daemon."""
    head = f"no isorun daemon answers on {uds}, and auto-start could not start one: {exc}"
    if os.geteuid() != 0:
        # the usual case: a user who is not root, with root's default paths
        return DaemonUnavailable(
            f"{head} (uid {os.geteuid()}). The isorun daemon runs as root, with a socket "
            f"and state that are root's: {_NOT_ROOT_WAYS}"
        )
    return DaemonUnavailable(
        f"{head}: set ISORUN_STATE_DIR to a directory it can write, or start `isorund` "
        "yourself (ISORUN_AUTOSTART=0 switches auto-start off)"
    )


def _log_tail(path: Path, start: int, lines: int = 10) -> str:
    """The last `lines` lines `path` got from offset `start` on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"  (cannot read it: {exc})"
    got = text.strip().splitlines()[-lines:]
    return "\n".join("  " + line for line in got) if got else "  (it wrote nothing)"


def _answers(uds: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=uds), timeout=2.0) as c:
            return c.get("http://isorund/v1/health").status_code == 200
    except httpx.HTTPError:
        return False
