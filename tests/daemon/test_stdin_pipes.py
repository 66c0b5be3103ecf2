"""A sandbox keeps at most MAX_PIPES stdin pipes open; making room never cuts one that a
request is writing to: its writer was told the process had exited (409) while the process
ran on with part of the bytes, which a retry would then send twice."""

from __future__ import annotations

import base64
import threading

from daemonhelpers import Daemon, ndjson

from isorun.daemon.stdin import MAX_PIPES


def test_a_pipe_being_written_to_is_not_closed_to_make_room(daemon: Daemon, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}"

    def start(cmd: str) -> str:
        with daemon.client() as c:
            r = c.post(f"{base}/exec", json={"cmd": cmd, "background": True, "open_stdin": True})
            assert r.status_code == 200, r.text
            return str(r.json()["proc_id"])

    slow = start("sleep 4; cat > /tmp/slow")  # reads nothing for 4 s, then all
    data = bytes(range(256)) * 4096  # 1 MiB: more than the guest's pipe and window hold
    answer: list[int] = []

    def write_slow() -> None:
        with daemon.client() as c:
            answer.append(c.post(f"{base}/processes/{slow}/stdin", content=data).status_code)

    writer = threading.Thread(target=write_slow)
    writer.start()
    others = [start("cat > /dev/null") for _ in range(MAX_PIPES)]
    with daemon.client() as c:
        for proc in others:  # each opens a pipe: the oldest idle ones make room
            r = c.post(f"{base}/processes/{proc}/stdin", content=b"x\n")
            assert r.status_code == 200, r.text
    writer.join(60)
    assert answer == [200]
    with daemon.client() as c:
        assert c.post(f"{base}/processes/{slow}/stdin/close").status_code == 200
        records = ndjson(c.post(f"{base}/exec", json={"cmd": "sleep 0.5; wc -c < /tmp/slow"}))
        assert base64.b64decode(records[1]["data"]).strip() == str(len(data)).encode()
