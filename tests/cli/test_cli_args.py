"""Bad command lines get a usage message and a non-zero exit, never a Python traceback. No
daemon is needed: these fail before any request (or say that no daemon answers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from isorun.cli.main import parse_args

pytestmark = pytest.mark.no_tools
CLI = [sys.executable, "-m", "isorun.cli"]


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        ISORUN_SOCKET=str(tmp_path / "nobody.sock"),
        ISORUN_AUTOSTART="0",
        ISORUN_STATE_DIR=str(tmp_path / "state"),
    )
    for k in ("ISORUN_API_URL", "ISORUN_API_KEY"):
        env.pop(k, None)
    return subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "-e", "FOO", "base", "--", "true"], "'FOO' is not KEY=VALUE"),
        (["run", "-e", "=x", "base", "--", "true"], "'=x' is not KEY=VALUE"),
        (["ls", "-m", "team"], "'team' is not KEY=VALUE"),
        (["keys", "revoke"], "give the key id"),
        # Without `--`, an option after IMAGE would be run as the program: refused instead.
        (["run", "base", "--keep", "echo", "hi"], "'--keep' is not a command"),
        (["exec", "sb-1", "--json", "true"], "'--json' is not a command"),
        # an id that would address another route is refused before any request
        (["kill", "../../v1/info"], "is not an id"),
        (["logs", "a/b"], "is not an id"),
        (["exec", "a/b", "--", "true"], "is not an id"),
        (["keys", "revoke", "x/y"], "is not an id"),
        (["ls"], "no isorun daemon answers"),
        (["--api-url", "ftp://x", "ls"], "API URL 'ftp://x' (api_url, --api-url"),
        (["exec", "", "--", "true"], "(`isorun ls`,"),
        # bytes that are not UTF-8 (a shell's $'\x80') cannot go into the API's JSON
        (["run", "-e", "A=\udc80", "base", "--", "true"], "b'A=\\x80' is not UTF-8 text"),
        (["exec", "sb-1", "--", "echo", "\udcff"], "b'\\xff' is not UTF-8 text"),
        # --json after the subcommand is taken (it then fails only for want of a daemon).
        (["ls", "--json"], "no isorun daemon answers"),
        (["usage", "--json"], "no isorun daemon answers"),
        # ... and between an action and its argument
        (["images", "inspect", "--json", "base"], "no isorun daemon answers"),
        (["keys", "create", "--json", "bob"], "no isorun daemon answers"),
        (["keys", "revoke", "--json", "k1"], "no isorun daemon answers"),
        (["images", "base"], "invalid choice: 'base'"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    r = _cli(tmp_path, *argv)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr, r.stderr


def test_daemon_help_is_isorunds(tmp_path: Path) -> None:
    """`isorun daemon --help` lists the flags `isorun daemon` passes on to isorund."""
    r = _cli(tmp_path, "daemon", "--help")
    assert r.returncode == 0, r.stderr
    assert "--kill-on-exit" in r.stdout and "--tcp" in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("argv", "cmd"),
    [
        (["exec", "sb-1", "grep", "--", "-v", "f"], ["grep", "--", "-v", "f"]),
        (["run", "base", "echo", "--", "x"], ["echo", "--", "x"]),
        (["exec", "sb-1", "--", "grep", "--", "-v"], ["grep", "--", "-v"]),
        (["run", "--keep", "base", "--", "true"], ["true"]),
        (["exec", "sb-1", "ls", "-l"], ["ls", "-l"]),
    ],
)
def test_a_dash_dash_after_the_command_began_is_the_commands(
    argv: list[str], cmd: list[str]
) -> None:
    # docs/api.md: without a `--` after IMAGE/ID everything after it is the command; a later
    # `--` was cut out of it (`grep -- -v f` ran `grep -v f`, inverting the match).
    assert parse_args(argv).cmd == cmd


@pytest.mark.parametrize(
    "argv",
    [["kill", "a/b"], ["exec", "", "--", "true"], ["exec", "sb-1", "--", "caf\udce9"]],
    ids=["id-with-slash", "empty-id", "not-utf8"],
)
def test_argument_errors_without_a_usage_exit_1(tmp_path: Path, argv: list[str]) -> None:
    # docs/api.md: an argument error exits 1; 2 is argparse's own, which prints the usage
    r = _cli(tmp_path, *argv)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("isorun: ") and "usage:" not in r.stderr, r.stderr
