"""A stand-in for what answers at an API URL (a fake daemon, a proxy), served on loopback
from a thread for the length of a with block."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free loopback port; yields its http:// URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


SID = "sb-0123456789abcdef"
SANDBOX = {"id": SID, "state": "running", "image": "base", "vcpus": 1, "memory_mib": 256}
# A process as GET .../processes lists it (a running `sh`).
PROC = {
    "proc_id": "p1",
    "pid": 7,
    "argv": ["sh"],
    "tag": "",
    "pty": False,
    "running": True,
    "exit_code": None,
    "signal": None,
    "started_unix_ms": 0,
    "output_bytes": 0,
}


def run_cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI against the daemon at `api`, never starting one of its own."""
    env = {**os.environ, "ISORUN_API_URL": api, "ISORUN_AUTOSTART": "0"}
    return subprocess.run(
        [sys.executable, "-m", "isorun.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class FakeDaemon(BaseHTTPRequestHandler):
    """A daemon that answers by route: `routes` are (method, path regex, handler); what no
    route takes gets what the real daemon would answer for health and a sandbox's GET, else
    404. Each request is recorded in `seen` as (method, path)."""

    protocol_version = "HTTP/1.1"
    routes: ClassVar[list[tuple[str, re.Pattern[str], Callable[[FakeDaemon], None]]]] = []
    seen: ClassVar[list[tuple[str, str]]] = []

    def _dispatch(self, method: str) -> None:
        size = int(self.headers.get("content-length") or 0)
        self.body = self.rfile.read(size) if size else b""
        type(self).seen.append((method, self.path))
        for m, rx, fn in type(self).routes:
            if m == method and rx.search(self.path):
                fn(self)
                return
        if self.path.startswith("/v1/health"):
            self.json(200, {"ok": True, "stream_keepalive_s": 15})
        elif method == "GET" and re.fullmatch(r"/v1/sandboxes/[^/?]+", self.path):
            self.json(200, SANDBOX)
        else:
            self.json(404, {"error": {"code": "not_found", "message": f"{method} {self.path}"}})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def raw(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def json(self, status: int, obj: object) -> None:
        self.raw(status, json.dumps(obj).encode(), "application/json")

    def start_chunked(self, kind: str = "application/x-ndjson") -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def cut(self) -> None:
        """Break the connection off mid-body (no last chunk)."""
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Fake:
    url: str
    seen: list[tuple[str, str]]

    def asked(self, method: str, pattern: str) -> bool:
        return any(m == method and re.search(pattern, p) for m, p in self.seen)


Route = tuple[str, str, Callable[[FakeDaemon], None]]


@contextlib.contextmanager
def fake_daemon(routes: Sequence[Route]) -> Iterator[Fake]:
    """Serve a FakeDaemon taking `routes`."""
    seen: list[tuple[str, str]] = []
    compiled = [(m, re.compile(p), fn) for m, p, fn in routes]
    handler = type("Routed", (FakeDaemon,), {"routes": compiled, "seen": seen})
    with serving(handler) as url:
        yield Fake(url, seen)


def answer(obj: object, status: int = 200) -> Callable[[FakeDaemon], None]:
    return lambda h: h.json(status, obj)


def answer_raw(body: bytes, kind: str = "application/json") -> Callable[[FakeDaemon], None]:
    return lambda h: h.raw(200, body, kind)


def ndjson(*records: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
