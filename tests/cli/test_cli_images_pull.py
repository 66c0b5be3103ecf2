"""`isorun images pull` and `isorun run` progress: on a real pseudo-terminal (one line redrawn
with carriage returns), as JSON lines with --json, and clear errors; real daemon pulling from
the loopback registry (one VM boot)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon
from pullhelpers import Registry, push_busybox, registry

pytestmark = pytest.mark.vm
__all__ = ["registry"]
CLI = [sys.executable, "-m", "isorun.cli"]


@pytest.fixture(scope="module")
def pull_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("isorund-cli-pull"), own_images=True) as d:
        yield d


def _on_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a new pseudo-terminal; return (code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    # read until EIO: every writer closed the terminal (ours is closed above), so what the
    # CLI wrote before it exited has all come through the tty layer, however late; a child
    # it left holding the terminal is given 5 s
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO
                chunk = b""
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            deadline = min(deadline, time.monotonic() + 5)
    os.close(master)
    return proc.wait(30), buf.decode(errors="replace")


def test_pull_on_a_terminal_draws_one_progress_line(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(registry, tmp_path, "clipull/bb:v1")
    ref = f"{registry.host}/clipull/bb:v1"
    code, out = _on_pty([*CLI, "images", "pull", ref], pull_daemon.env)
    assert code == 0, out
    # Redrawn in place: carriage return + erase line before each state.
    states = [s for s in out.split("\r\x1b[K") if s]
    assert any("pulling [" in s and "100%" in s for s in states), out
    assert [s for s in states if "unpacking layers" in s] and "ready sha256:" in out
    assert out.rstrip().endswith("MiB") and digest in out
    # Listed afterwards.
    r = subprocess.run([*CLI, "images"], env=pull_daemon.env, capture_output=True, text=True)
    assert r.returncode == 0 and ref in r.stdout


def test_pull_json_lines_and_errors(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    push_busybox(registry, tmp_path, "clipull/json:v1", marker="json")
    ref = f"{registry.host}/clipull/json:v1"
    r = subprocess.run(
        [*CLI, "--json", "images", "pull", ref],
        env=pull_daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]  # every line parses
    assert recs[0] == {
        "type": "progress",
        "phase": "resolving",
        "ref": ref,
        "message": recs[0]["message"],
    }
    assert {x["phase"] for x in recs[:-1]} >= {"pulling", "unpacking", "converting", "done"}
    assert recs[-1]["type"] == "image" and recs[-1]["image"]["digest"].startswith("sha256:")
    # Not on a terminal and not --json: one plain line per phase, no carriage returns.
    r = subprocess.run(
        [*CLI, "images", "pull", ref],
        env=pull_daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "\r" not in r.stderr and "cached" in r.stderr
    # A missing image: a JSON error record (and exit 1); a plain message without --json.
    missing = f"{registry.host}/clipull/missing:v1"
    r = subprocess.run(
        [*CLI, "--json", "images", "pull", missing],
        env=pull_daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["type"] == "error" and last["code"] == "not_found" and missing in last["message"]
    r = subprocess.run(
        [*CLI, "images", "pull", "Bad Ref!!"],
        env=pull_daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "invalid image 'Bad Ref!!'" in r.stderr


def test_run_on_a_terminal_shows_pull_and_boot(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    push_busybox(registry, tmp_path, "clipull/run:v1", marker="cli-run")
    ref = f"{registry.host}/clipull/run:v1"
    code, out = _on_pty([*CLI, "run", ref, "--", "cat", "/etc/marker"], pull_daemon.env)
    assert code == 0, out
    assert "pulling [" in out and "booting VM" in out
    assert out.rstrip().endswith("cli-run"), out
