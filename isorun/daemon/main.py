"""`isorund`: serve the API on a unix socket (mode 0600) and, optionally, TCP (API keys)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import socket
import stat
from pathlib import Path
from typing import Any

import uvicorn

from isorun.daemon.app import create_app
from isorun.daemon.config import DaemonConfig, tenant_registries
from isorun.daemon.sandboxes import SandboxManager
from isorun.daemon.store import Store
from isorun.errors import ConfigError
from isorun.escapes import IN_A_LOG_LINE


def _unix_listener(path: Path) -> socket.socket:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"isorund: cannot make the directory of the socket {path}: {exc}") from exc
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket of a dead daemon
    else:
        raise SystemExit(f"isorund: another daemon is already serving {path}")
    finally:
        probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError as exc:
        s.close()
        raise SystemExit(f"isorund: cannot listen on the socket {path}: {exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(256)
    s.setblocking(False)
    return s


def _make_state_dir(path: Path) -> None:
    """Make the state dir root's alone (0700), an existing one too (older daemons made it
    0755): its database holds sandboxes' env (API keys) and their consoles. A shared,
    sticky dir (the operator's /tmp) is left as it is; the database files are 0600 anyway."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise SystemExit(f"isorund: cannot make the state dir {path}: {exc}") from exc


def _lock_state_dir(state_dir: Path) -> int:
    """Hold the state dir for this process's life: a second daemon on it (another socket)
    would take the first's VMs for its own, fail to adopt them and end them, billing them
    twice."""
    path = state_dir / "isorund.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SystemExit(f"isorund: cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = ""
        with contextlib.suppress(OSError, ValueError):
            pid = f" (pid {int((state_dir / 'isorund.pid').read_text())})"
        raise SystemExit(
            f"isorund: another daemon{pid} uses the state dir {state_dir}; stop it, or give "
            "this one another --state-dir"
        ) from None
    return fd


def _tcp_address(spec: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty, for 127.0.0.1, or an [IPv6] address), checked: a bad
    port was a traceback (int() or bind's OverflowError)."""
    host, _, port = spec.rpartition(":")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise SystemExit(
            f"isorund: --tcp (ISORUN_TCP) {spec!r} is not HOST:PORT with a port number from "
            "1 to 65535, e.g. 127.0.0.1:8181"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def _tcp_listener(spec: str) -> socket.socket:
    host, port = _tcp_address(spec)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the host
        s.close()
        raise SystemExit(f"isorund: cannot listen on TCP {spec}: {exc}") from exc
    s.listen(256)
    s.setblocking(False)
    return s


async def serve(cfg: DaemonConfig) -> None:
    # MicroVM puts run dirs under $ISORUN_STATE_DIR/vms; keep it in step with our state dir.
    os.environ["ISORUN_STATE_DIR"] = str(cfg.state_dir)
    _make_state_dir(cfg.state_dir)
    # Lock, then listen: a daemon that finds another on its state dir or its socket exits
    # before it touches the state or the pid file, which are the serving daemon's.
    lock_fd = _lock_state_dir(cfg.state_dir)
    try:
        socks = [_unix_listener(cfg.socket_path)]
    except BaseException:
        os.close(lock_fd)
        raise
    try:
        if cfg.tcp:
            socks.append(_tcp_listener(cfg.tcp))
        store = Store(cfg.db_path)
    except BaseException:
        _unlink_socket(cfg.socket_path)
        os.close(lock_fd)
        raise
    pid_file = cfg.state_dir / "isorund.pid"
    try:  # whatever fails from here on, the socket and pid file go with it
        pid_file.write_text(f"{os.getpid()}\n")
        manager = SandboxManager(cfg, store)
        app = create_app(cfg, store, manager)
        config = uvicorn.Config(
            app,
            log_level=os.environ.get("ISORUN_LOG_LEVEL", "warning").lower(),
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        # uvicorn handles SIGTERM/SIGINT: graceful stop, VMs are kept (SandboxManager.stop).
        await server.serve(sockets=socks)
    finally:
        _unlink_socket(cfg.socket_path)
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():  # not another daemon's
                pid_file.unlink()
        store.close()
        os.close(lock_fd)  # last: the state is free once the store is closed


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, with no terminal escapes: messages carry guest
    text (an agent's error), and a guest wrote a forged second log line and terminal
    escapes into the daemon's log that way. A traceback, the daemon's own, is kept as is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(IN_A_LOG_LINE)
        return super().formatMessage(record)


# Open files the daemon allows itself (soft RLIMIT_NOFILE, up to the hard limit): each
# sandbox holds several sockets and a pidfd, each stream a connection, and the common
# default of 1024 runs out with a few hundred. Capped: its children (QEMU, skopeo, mkfs)
# inherit it, and a program that closes every fd up to its limit pays per fd.
OPEN_FILES = 1 << 16


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _unlink_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_socket():
            path.unlink()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="isorund", description="isorun sandbox daemon")
    p.add_argument(
        "--socket",
        type=Path,
        help="unix socket (default $ISORUN_SOCKET or /run/isorun/isorund.sock)",
    )
    p.add_argument("--tcp", help="also listen on HOST:PORT (API keys required)")
    p.add_argument("--state-dir", type=Path, help="SQLite state and VM run dirs")
    p.add_argument("--image-dir", type=Path)
    p.add_argument("--cpu-overcommit", type=float)
    p.add_argument("--mem-overcommit", type=float)
    p.add_argument("--price-per-vcpu-hour", type=float)
    p.add_argument(
        "--tenant-registries",
        help="registries API-key tenants may pull from: `public` (any on a public address, "
        "pulled anonymously) and/or host[:port] names (pulled with the daemon's credentials), "
        "comma-separated; '' for none (default $ISORUN_TENANT_REGISTRIES or public)",
    )
    p.add_argument(
        "--kill-on-exit",
        action="store_true",
        help="kill sandboxes on a clean stop (default: keep them for re-adoption)",
    )
    a = p.parse_args(argv)
    # Flags over the environment, given to DaemonConfig (not set after it) so that its
    # checks see them too.
    flags: dict[str, Any] = {"kill_on_exit": a.kill_on_exit}
    for name in (
        "socket",
        "tcp",
        "state_dir",
        "image_dir",
        "cpu_overcommit",
        "mem_overcommit",
        "price_per_vcpu_hour",
    ):
        v = getattr(a, name)
        if v is not None:
            flags["socket_path" if name == "socket" else name] = v
    try:
        if a.tenant_registries is not None:
            flags["tenant_registries"] = tenant_registries(
                a.tenant_registries, "--tenant-registries"
            )
        cfg = DaemonConfig(**flags)
    except ConfigError as exc:
        raise SystemExit(f"isorund: {exc}") from None
    if cfg.tcp:
        _tcp_address(cfg.tcp)  # a bad one refused before the state dir or socket is touched
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(
        level=os.environ.get("ISORUN_LOG_LEVEL", "INFO").upper(), handlers=[handler]
    )
    _raise_open_files_limit()
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
