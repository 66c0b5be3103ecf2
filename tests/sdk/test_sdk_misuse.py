"""The daemon as the SDK meets it: a daemon that loses a start-up race leaves the pid
file of the one that serves alone; a tenant key is told which admin action it may not do."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemonhelpers import REPO, Daemon

from isorun import ApiError, Images


def test_a_daemon_that_loses_the_start_race_leaves_the_pid_file_alone(daemon: Daemon) -> None:
    pid_file = daemon.state / "isorund.pid"
    assert daemon.proc is not None and int(pid_file.read_text()) == daemon.proc.pid
    loser = subprocess.run(
        [sys.executable, "-m", "isorun.daemon"],
        env=daemon.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loser.returncode != 0 and "already serving" in loser.stderr, loser.stderr
    assert int(pid_file.read_text()) == daemon.proc.pid  # still the one that serves
    with daemon.client() as c:
        assert c.get("/v1/health").status_code == 200


def test_an_api_key_is_told_which_admin_action_it_may_not_do(daemon: Daemon) -> None:
    with daemon.client() as c:
        key = c.post("/v1/keys", json={"tenant_id": "t-admin", "name": "k"}).json()["key"]
    images = Images(api_url=f"http://127.0.0.1:{daemon.port}", api_key=key)
    for call, what in (
        (images.gc, "garbage-collecting images"),
        (lambda: images.remove("base"), "removing images"),
        (images.disk_usage, "seeing the image store's disk usage"),
    ):
        with pytest.raises(ApiError, match=f"^{what} is for the local administrator") as err:
            call()
        assert err.value.status == 403
    with daemon.tcp(key) as t:
        refused = t.get("/v1/keys")
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("managing API keys is for")
