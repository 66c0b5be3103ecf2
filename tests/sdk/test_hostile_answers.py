"""Answers the daemon (or a proxy before it) got wrong: a stream cut mid-line, records of the
wrong shape, an exit status no process has. The SDK raises its own ApiError (what
`except IsorunError` catches) and the CLI says so in one line, never a traceback or a
success. No VM boots here: a fake daemon answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from fakeapi import run_cli, serving

from isorun import ApiError
from isorun.sdk._progress import ProgressDecoder
from isorun.sdk._records import StreamDecoder

SID = "sb-0123456789abcdef"


@pytest.mark.parametrize(
    "line",
    [
        '{"type":"stdout","data":"aGk',  # cut mid-line
        "[1]",
        '{"type":"stdout"}',
        '{"type":"stdout","data":"!!"}',  # no base64: its bytes were dropped silently
        '{"type":"start","pid":3}',
        '{"type":"attached","offset":"x"}',
    ],
)
def test_a_malformed_output_record_is_an_api_error(line: str) -> None:
    dec = StreamDecoder()
    with pytest.raises(ApiError) as err:
        dec.feed(line)
    assert err.value.code == "stream_malformed" and err.value.status == 502


@pytest.mark.parametrize("exit", [{"exit_code": 256}, {"exit_code": -1}, {"signal": 128}])
def test_an_exit_no_process_has_is_an_api_error(exit: dict[str, int]) -> None:
    dec = StreamDecoder()
    dec.feed(json.dumps({"type": "exit", "exit_code": None, "signal": None, **exit}))
    with pytest.raises(ApiError, match="exit record"):
        dec.result()


def test_a_progress_stream_cut_mid_line_is_an_api_error() -> None:
    with pytest.raises(ApiError) as err:
        ProgressDecoder().feed('{"type":"progress","phase":"pul')
    assert err.value.code == "stream_malformed"


class _Daemon(BaseHTTPRequestHandler):
    """Answers of the wrong shape where the real daemon's would be."""

    def _send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.endswith("/logs"):
            self._send(302, b"moved", "text/plain", location="http://elsewhere/")
        else:
            info = {"id": SID, "state": "running", "image": "base", "vcpus": 1}
            self._send(200, json.dumps(info).encode(), "application/json")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        out = base64.b64encode(b"hi\n").decode()
        lines = [
            {"type": "start", "proc_id": "p1", "pid": 7},
            {"type": "stdout", "data": out},
            {"type": "exit", "proc_id": "p1", "exit_code": 256, "signal": None},
        ]
        body = "".join(json.dumps(x) + "\n" for x in lines).encode()
        self._send(200, body, "application/x-ndjson")

    def do_DELETE(self) -> None:
        self._send(200, b"{}", "application/json")  # ended meanwhile: no bill yet

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_daemon() -> Iterator[str]:
    with serving(_Daemon) as url:
        yield url


def test_the_cli_says_what_is_wrong_with_an_answer_in_one_line(fake_daemon: str) -> None:
    # exit status 256 was exit 0 for the shell (sys.exit(256)): a failure read as success
    r = run_cli(fake_daemon, "exec", SID, "--", "true")
    assert r.returncode == 1 and "exit record" in r.stderr, r
    # a redirect's body was printed as the console, exit 0
    r = run_cli(fake_daemon, "logs", SID)
    assert r.returncode == 1 and "redirect" in r.stderr and "moved" not in r.stdout, r
    # a kill answered without its bill: killed all the same, said so, no KeyError traceback
    r = run_cli(fake_daemon, "kill", SID)
    assert r.returncode == 0 and f"killed {SID}" in r.stdout, r
    for r in (run_cli(fake_daemon, "kill", SID), run_cli(fake_daemon, "logs", SID)):
        assert "Traceback" not in r.stderr, r.stderr
