"""A sandbox has at most MAX_STREAMS_PER_SANDBOX output streams open at once (foreground
execs and GET .../stream together): each may hold up to STREAM_BACKLOG_BYTES for a client
slower than its process, and the guest agent allows 4096 requests, so a tenant opening
streams it never reads grew the daemon without a bound."""

from __future__ import annotations

import contextlib
import time

import httpx
from daemonhelpers import Daemon

from isorun.daemon.routes_processes import MAX_STREAMS_PER_SANDBOX


def test_streams_past_the_cap_are_refused_and_a_closed_one_frees_its_place(
    daemon: Daemon, sandbox: str
) -> None:
    base = f"/v1/sandboxes/{sandbox}"
    with daemon.client() as c:
        r = c.post(f"{base}/exec", json={"cmd": "sleep 600", "background": True})
        assert r.status_code == 200, r.text
        proc = r.json()["proc_id"]
    limits = httpx.Limits(max_connections=MAX_STREAMS_PER_SANDBOX + 8)
    transport = httpx.HTTPTransport(uds=str(daemon.sock), limits=limits)
    client = httpx.Client(base_url="http://isorund", transport=transport, timeout=120)
    with contextlib.ExitStack() as streams, client as c:
        opened = []
        for _ in range(MAX_STREAMS_PER_SANDBOX):
            s = streams.enter_context(c.stream("GET", f"{base}/processes/{proc}/stream"))
            assert s.status_code == 200
            opened.append(s)
        # one more, of either kind: refused before anything starts
        r = c.get(f"{base}/processes/{proc}/stream", timeout=10)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_streams"
        assert f"{MAX_STREAMS_PER_SANDBOX} output streams open" in r.json()["error"]["message"]
        r = c.post(f"{base}/exec", json={"cmd": "touch /tmp/ran"}, timeout=10)
        assert r.status_code == 429, r.text
        # another request of the sandbox is not a stream
        assert c.get(f"{base}/processes").status_code == 200
        opened.pop().close()
        # the place is free once the daemon has seen the close
        for _ in range(50):
            r = c.post(f"{base}/exec", json={"cmd": "test -e /tmp/ran || echo fresh"})
            if r.status_code != 429:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert "fresh" in r.text or "ZnJlc2gK" in r.text  # stdout is base64 in the stream
    with daemon.client() as c:
        c.post(f"{base}/processes/{proc}/kill", json={})
