"""The `isorun` CLI against a real daemon: exit codes, streams, --json."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from daemonhelpers import Daemon

pytestmark = pytest.mark.vm


def test_cli_run_ls_kill(daemon: Daemon, image: str) -> None:
    env = dict(daemon.env)
    cli = [sys.executable, "-m", "isorun.cli"]
    r = subprocess.run(
        [*cli, "run", image, "--", "sh", "-c", "echo hi; echo no >&2; exit 4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stdout, r.stderr) == (4, "hi\n", "no\n")
    r = subprocess.run(
        [*cli, "run", "--keep", image, "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    sid = r.stderr.split()[1]
    rows = json.loads(
        subprocess.run(
            [*cli, "--json", "ls"], env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    assert [x["id"] for x in rows] == [sid]
    r = subprocess.run(
        [*cli, "exec", sid, "--", "echo", "in", "there"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout == "in there\n"
    assert (
        "agent"
        in subprocess.run(
            [*cli, "logs", sid], env=env, capture_output=True, text=True, timeout=60
        ).stdout
    )
    killed = subprocess.run(
        [*cli, "kill", sid], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # what it used and what it cost, as the README promises
    m = re.fullmatch(
        rf"killed {sid}: cpu \d+ ms, peak memory \d+ B, uptime (\d+) ms, "
        r"billed (\d+) s, cost \$(\d+\.\d{6})\n",
        killed,
    )
    assert m, killed
    assert int(m[1]) > 0 and int(m[2]) >= 1 and float(m[3]) > 0
    r = subprocess.run([*cli, "kill", sid], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ended" in r.stderr
    # an ended sandbox's console is what it was as it ended, not nothing
    ended_logs = subprocess.run(
        [*cli, "--json", "logs", sid], env=env, capture_output=True, text=True, timeout=60
    )
    assert "isorun-agent: ready" in json.loads(ended_logs.stdout)["console"], ended_logs
    u = json.loads(
        subprocess.run(
            [*cli, "--json", "usage"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert u["total"]["sandboxes"] >= 2


def test_cli_binary_output_is_exact(daemon: Daemon, image: str) -> None:
    """Bytes that are not UTF-8 reach our stdout and stderr unchanged (no U+FFFD)."""
    cli = [sys.executable, "-m", "isorun.cli"]
    r = subprocess.run(
        [*cli, "run", image, "--", "sh", "-c", r"printf '\377\376\000a\200'; printf '\351' >&2"],
        env=daemon.env,
        capture_output=True,
        timeout=120,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, b"\xff\xfe\x00a\x80", b"\xe9")


def test_cli_options_after_the_image_are_options(daemon: Daemon, image: str) -> None:
    """`isorun run IMAGE -e K=V -- CMD`: -e is ours, not the program to run."""
    cli = [sys.executable, "-m", "isorun.cli"]
    r = subprocess.run(
        [*cli, "run", image, "-e", "GREETING=hi there", "--", "sh", "-c", "echo $GREETING"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi there\n", "")


def test_cli_json_result_says_what_was_left_out_and_the_signal(daemon: Daemon, image: str) -> None:
    """--json keeps each stream's newest 64 MiB (the SDK's capture limit): a script must be
    told that older output was left out, and a command ended by a signal must say which
    (its exit_code is null)."""
    over = 1000
    cmd = f"tr '\\0' a </dev/zero | head -c {(64 << 20) + over}; echo oops >&2; kill -9 $$"
    r = subprocess.run(
        [sys.executable, "-m", "isorun.cli", "--json", "run", image, "--", "sh", "-c", cmd],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 128 + 9, r.stderr
    res = json.loads(r.stdout)
    assert (res["exit_code"], res["signal"], res["timed_out"]) == (None, 9, False)
    assert (res["stdout_dropped"], len(res["stdout"]), set(res["stdout"])) == (
        over,
        64 << 20,
        {"a"},
    )
    assert (res["stderr"], res["stderr_dropped"]) == ("oops\n", 0)
    assert res["usage"]["uptime_ms"] > 0


def _running(daemon: Daemon, sid: str) -> list[list[str]]:
    with daemon.client() as c:
        procs = c.get(f"/v1/sandboxes/{sid}/processes").json()["processes"]
    return [p["argv"] for p in procs if p["running"]]


def test_cli_interrupt_and_closed_pipe_stop_the_command(daemon: Daemon, image: str) -> None:
    """^C: exit 130 with a one-line message, no traceback, and the command is stopped in the
    sandbox (not left running there). A closed stdout (`| head`): exit 141, quietly, same."""
    with daemon.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
    cli = [sys.executable, "-m", "isorun.cli", "exec", sid, "--"]
    try:
        p = subprocess.Popen(
            [*cli, "sh", "-c", "echo started; sleep 300"],
            env=daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # ^C's SIGINT as a terminal delivers it, even when this suite runs as a
            # background job (whose commands inherit SIGINT ignored, so the CLI would be too)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err == b"isorun: interrupted\n", err
        deadline = time.monotonic() + 30
        while _running(daemon, sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(daemon, sid) == []

        p = subprocess.Popen(
            [*cli, "yes"], env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert p.stdout is not None and p.stdout.readline() == b"y\n"
        p.stdout.close()  # as `| head -1` does
        assert p.wait(60) == 141
        assert p.stderr is not None and p.stderr.read() == b""
        deadline = time.monotonic() + 30
        while _running(daemon, sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(daemon, sid) == []

        # `run --keep` interrupted keeps its sandbox and says which (it named none)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "isorun.cli",
                "run",
                "--keep",
                image,
                "--",
                "sh",
                "-c",
                "echo started; sleep 300",
            ],
            env=daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        kept = re.fullmatch(rb"sandbox (sb-[0-9a-f]+) kept running\nisorun: interrupted\n", err)
        assert p.returncode == 130 and kept, err
        with daemon.client() as c:
            row = c.get(f"/v1/sandboxes/{kept.group(1).decode()}").json()
            assert row["state"] == "running", row
            c.delete(f"/v1/sandboxes/{row['id']}")
    finally:
        with daemon.client() as c:
            c.delete(f"/v1/sandboxes/{sid}")


def test_cli_logs_to_a_terminal_carry_no_escape_sequences(daemon: Daemon, image: str) -> None:
    """The console is the guest's to write: `isorun logs` passed its escape sequences (set
    the title, move the cursor, clear lines) to the viewer's terminal. On a terminal they
    are shown as escapes now; piped, the bytes are left as they were."""
    cli = [sys.executable, "-m", "isorun.cli"]
    with daemon.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": image}).json()["id"]
        c.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"cmd": r"printf 'MARK\033]0;pwned\007\033[2Kend\n' > /dev/console"},
        )
        try:
            main, sub = os.openpty()
            r = subprocess.run(
                [*cli, "logs", sid], env=daemon.env, stdout=sub, stderr=subprocess.PIPE, timeout=60
            )
            os.close(sub)
            seen = b""
            with contextlib.suppress(OSError):  # EIO once the writer is gone
                while chunk := os.read(main, 65536):
                    seen += chunk
            os.close(main)
            assert r.returncode == 0, r.stderr
            assert b"MARK\\x1b]0;pwned\\x07\\x1b[2Kend" in seen, seen[-500:]
            assert b"\x1b" not in seen and b"\x07" not in seen
            piped = subprocess.run(
                [*cli, "logs", sid], env=daemon.env, capture_output=True, timeout=60
            ).stdout
            assert b"MARK\x1b]0;pwned\x07\x1b[2Kend" in piped
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
