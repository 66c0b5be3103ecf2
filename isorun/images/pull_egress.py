"""A pull whose registry a tenant chose reaches the network only through a checking proxy.

Checking the reference's host before the pull is not enough: skopeo follows the registry's
redirects and its token realm by itself, so a public registry could send it on to
169.254.169.254 or to a service on the host's loopback. Such a pull runs skopeo in a network
namespace of its own that holds nothing but a loopback with this proxy on it. Every
connection skopeo makes goes through the proxy (HTTPS_PROXY / HTTP_PROXY): it resolves the
name itself, refuses unless every address is public unicast and not this host's, and
connects to an address it checked (no second lookup a name could rebind in between). Go
skips a proxy for loopback targets, but the namespace's loopback holds only the proxy.

The namespace is made by a thread of its own (unshare affects only the calling thread; the
thread then ends) and lives as long as the listening socket and the fd kept to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from isorun.images.errors import ImageError, RegistryUnreachableError
from isorun.images.registry_policy import out_of_reach, resolve

HEAD_LIMIT = 16 * 1024  # a request head from skopeo is well under 4 KiB
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
CHUNK = 256 * 1024
# hop-by-hop headers: the proxy's, not the origin's
_HOP_BY_HOP = {b"connection", b"proxy-connection", b"keep-alive", b"proxy-authorization", b"te"}
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH14x"


@dataclass
class PullEgress:
    """The proxy for one confined pull: run argv under `prefix` with `env`."""

    listener: socket.socket
    netns_fd: int
    refused: list[str] = field(default_factory=list)  # why connections were refused
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{os.getpid()}/fd/{self.netns_fd}", "--"]

    @property
    def env(self) -> dict[str, str]:
        url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        env = {"HTTPS_PROXY": url, "HTTP_PROXY": url, "NO_PROXY": ""}
        return env | {k.lower(): v for k, v in env.items()}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # either side went away: skopeo reports what it lost
        except asyncio.CancelledError:
            pass  # the pull is over (close()): ending here keeps asyncio from logging it
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, TimeoutError):
            return
        request = _parse_head(head)
        if request is None:
            return await _reply(writer, 400, "not an HTTP/1.1 proxy request")
        method, target = request.method, request.target.decode("ascii", "replace")
        if method == b"CONNECT":
            host, _, port_text = target.rpartition(":")
            host, path = host.strip("[]"), b""
        elif method in (b"GET", b"HEAD") and target.startswith("http://"):
            try:
                url = urlsplit(target)
                host, port_text = url.hostname or "", str(url.port or 80)
            except ValueError:  # a port that is not a number, an unclosed [
                return await _reply(writer, 400, f"bad target {target!r}")
            path = (url.path or "/").encode() + (b"?" + url.query.encode() if url.query else b"")
        else:
            return await _reply(writer, 405, "a pull only reads: CONNECT, GET or HEAD")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return await _reply(writer, 400, f"bad target {target!r}")
        port = int(port_text)
        try:
            addresses = await resolve(host, port)
        except RegistryUnreachableError as exc:
            return await _reply(writer, 502, str(exc))
        if (reason := out_of_reach(host, addresses)) is not None:
            why = f"{host}:{port} {reason}"
            self.refused.append(why)
            return await _reply(writer, 403, why)
        upstream = await _connect(addresses, port)
        if upstream is None:
            return await _reply(writer, 502, f"cannot connect to {host}:{port}")
        up_reader, up_writer = upstream
        try:
            if method == b"CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await _splice(reader, writer, up_reader, up_writer)
            else:
                # One request per connection, and nothing more of the client's goes on: Go
                # keeps one proxy connection for every plain-HTTP host, so its next request,
                # for another host, would reach this origin. The answer is relayed until the
                # origin closes (asked to), then the client's connection is closed.
                up_writer.write(_origin_head(request, path))
                await _pipe(up_reader, writer)
        finally:
            up_writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def pull_egress() -> AsyncIterator[PullEgress]:
    """A fresh namespace and proxy for one pull's skopeo runs; gone on exit."""
    listener, netns_fd = _netns_with_listener()
    egress = PullEgress(listener, netns_fd)
    try:
        server = await asyncio.start_server(egress.serve, sock=listener, limit=HEAD_LIMIT)
    except BaseException:
        listener.close()
        os.close(netns_fd)
        raise
    try:
        yield egress
    finally:
        os.close(netns_fd)  # first: a second cancellation below must not leak the namespace
        server.close()
        await egress.close()
        await server.wait_closed()


def _netns_with_listener() -> tuple[socket.socket, int]:
    """A new network namespace with loopback up and a listening socket on it, made by a
    thread that then ends (a pool thread would stay in the namespace and resolve names
    there for whoever uses it next)."""
    made: list[tuple[socket.socket, int]] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                ifr = fcntl.ioctl(sock, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0))
                flags = struct.unpack(_IFREQ, ifr)[1]
                fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))
                sock.bind(("127.0.0.1", 0))
                sock.listen(64)
                sock.setblocking(False)
                made.append((sock, os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)))
            except BaseException:
                sock.close()
                raise
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name="isorun-pull-netns")
    thread.start()
    thread.join()
    if failed:
        raise ImageError(
            f"cannot make a network namespace for a confined pull (needs root): {failed[0]}"
        )
    return made[0]


def _parse_head(head: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def _origin_head(request: h11.Request, path: bytes) -> bytes:
    lines = [request.method + b" " + path + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in request.headers.raw_items() if k.lower() not in _HOP_BY_HOP]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _connect(
    addresses: list[str], port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    for address in addresses:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await asyncio.open_connection(address, port, limit=CHUNK)
    return None


async def _reply(writer: asyncio.StreamWriter, status: int, why: str) -> None:
    body = why.encode() + b"\n"
    reason = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed"}.get(
        status, "Bad Gateway"
    )
    writer.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy src to dst until src ends, then end dst's side."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    finally:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either end of the tunnel has closed."""

    pipes = {
        asyncio.ensure_future(_pipe(reader, up_writer)),
        asyncio.ensure_future(_pipe(up_reader, writer)),
    }
    try:
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for p in pipes:
            p.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
