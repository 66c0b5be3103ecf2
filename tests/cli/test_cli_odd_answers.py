"""The CLI before answers no daemon of ours sends (a proxy's): one `isorun:` line and exit
1, never a traceback. A fake daemon answers; no VM boots."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "sdk"))

from fakeapi import SID, FakeDaemon, answer, answer_raw, fake_daemon, ndjson, run_cli


def _garbled(h: FakeDaemon) -> None:
    h.raw(200, b"this is not gzip", "application/json", content_encoding="gzip")


def test_ls_of_a_body_that_does_not_decode_is_one_line() -> None:
    with fake_daemon([("GET", r"/v1/sandboxes", _garbled)]) as fake:
        r = run_cli(fake.url, "ls")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("isorun: the answer to GET") and "could not be read" in r.stderr


def _exec_true(h: FakeDaemon) -> None:
    body = ndjson(
        {"type": "start", "proc_id": "p1", "pid": 7},
        {"type": "exit", "proc_id": "p1", "exit_code": 0, "signal": None, "duration_ms": 1},
    )
    h.raw(200, body, "application/x-ndjson")


def test_run_whose_bill_holds_infinity_is_one_line() -> None:
    """int(Infinity) in destroy() was an OverflowError, a traceback after the command ran."""
    routes = [
        ("POST", r"/v1/sandboxes$", answer({"id": SID, "state": "running"}, 201)),
        ("POST", r"/exec$", _exec_true),
        ("DELETE", r"/v1/sandboxes/sb-", answer_raw(b'{"cpu_ms": Infinity, "uptime_ms": 1}')),
    ]
    with fake_daemon(routes) as fake:
        r = run_cli(fake.url, "run", "base", "--", "true")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Infinity is not a JSON value" in r.stderr
