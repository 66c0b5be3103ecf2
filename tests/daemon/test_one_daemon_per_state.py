"""One daemon per state dir and per socket: a second one exits at once, naming which, and
leaves the first, its pid file, its sandboxes and their usage records alone."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
from daemonhelpers import REPO, Daemon, ndjson


@pytest.mark.parametrize("shares", ["state and socket", "state only", "socket only"])
def test_a_second_daemon_on_the_same_state_or_socket_exits_and_leaves_the_first_alone(
    daemon: Daemon, image: str, tmp_path: Path, shares: str
) -> None:
    """A second daemon on the same state dir with another socket used to start, take the
    first's VMs for its own, fail to adopt them and end them a minute later, billing each
    twice; one on the same socket overwrote the pid file."""
    pid_file = daemon.state / "isorund.pid"
    assert daemon.proc is not None and int(pid_file.read_text()) == daemon.proc.pid
    env = dict(daemon.env, ISORUN_TCP="")
    if shares == "state only":
        env["ISORUN_SOCKET"] = str(tmp_path / "other.sock")
    elif shares == "socket only":
        env["ISORUN_STATE_DIR"] = str(tmp_path / "other-state")
    with daemon.client() as c:
        sb = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
        loser = subprocess.run(
            [sys.executable, "-m", "isorun.daemon"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = "already serving" if shares == "socket only" else "uses the state dir"
        assert loser.returncode != 0 and said in loser.stderr, loser.stderr
        assert int(pid_file.read_text()) == daemon.proc.pid  # still the one that serves
        assert not (tmp_path / "other.sock").exists()
        out = ndjson(c.post(f"/v1/sandboxes/{sb}/exec", json={"cmd": "echo alive"}))
        assert base64.b64decode(out[1]["data"]) == b"alive\n" and out[-1]["exit_code"] == 0
        c.delete(f"/v1/sandboxes/{sb}")
        records = c.get("/v1/usage").json()["records"]
        assert [r["sandbox_id"] for r in records].count(sb) == 1
