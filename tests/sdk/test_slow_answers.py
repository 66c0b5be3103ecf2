"""Requests the daemon may rightly hold longer than the SDK's usual 60 s: a kill waits out
its `grace` for a process that ignores SIGTERM, a stdin write up to 60 s for a process not
reading before its 409. The SDK waited 60 s and said the daemon was gone (DaemonUnavailable)
though the kill went through, or a 409 was coming. Here against a small HTTP server that
answers as slowly as the daemon would, with the SDK's timeouts scaled down (0.5 s for 60)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from fakeapi import serving

from isorun import AsyncSandbox, Sandbox
from isorun.sdk import _core

USUAL = 0.5  # the SDK's usual timeout here (60 s for real)
SANDBOX = {"id": "sb-0123456789abcdef", "image": "base", "state": "running"}
PROCESS = {
    "proc_id": "p1",
    "pid": 7,
    "argv": ["sh", "-c", "trap '' TERM; cat"],
    "tag": "",
    "pty": False,
    "running": True,
    "exit_code": None,
    "signal": None,
    "started_unix_ms": 0,
    "output_bytes": 0,
}


class _SlowDaemon(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.endswith("/processes"):
            self._answer({"processes": [PROCESS]})
        elif self.path.startswith("/v1/sandboxes/"):
            self._answer(SANDBOX)
        else:
            self._answer({"ok": True})  # health

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path.endswith("/kill"):
            time.sleep(json.loads(body)["grace"])  # SIGTERM ignored: SIGKILL after grace
            self._answer({"exit_code": None, "signal": 9})
        else:  # stdin, stdin/close: the process reads at last, after the usual timeout
            time.sleep(2 * USUAL)
            self._answer({})

    def _answer(self, obj: object) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(_core, "DEFAULT_TIMEOUT", USUAL)
    # room past the slow answers (a busy host's), yet the usual timeout is well below them
    monkeypatch.setattr(_core, "KILL_MARGIN_S", 6 * USUAL)
    monkeypatch.setattr(_core, "STDIN_TIMEOUT", 10 * USUAL)
    with serving(_SlowDaemon) as url:
        yield url


def test_a_kill_waits_out_its_grace_and_stdin_its_answer(slow_api: str) -> None:
    sb = Sandbox.connect(SANDBOX["id"], api_url=slow_api, autostart=False)
    try:
        p = sb.processes.connect("p1")
        p.send_stdin(b"read at last\n")
        p.close_stdin()
        assert p.kill(grace=3 * USUAL) == {"exit_code": None, "signal": 9}
    finally:
        sb.close()


async def test_async_a_kill_waits_out_its_grace_and_stdin_its_answer(slow_api: str) -> None:
    sb = await AsyncSandbox.connect(SANDBOX["id"], api_url=slow_api, autostart=False)
    try:
        p = await sb.processes.connect("p1")
        await p.send_stdin(b"read at last\n")
        await p.close_stdin()
        assert await p.kill(grace=3 * USUAL) == {"exit_code": None, "signal": 9}
    finally:
        await sb.close()
