"""A daemon setting out of range is refused at start with one `isorund:` line naming it,
not taken without a word and then failing every create or every end later. No VM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemonhelpers import REPO


def _start(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """isorund with `args` and `env`, which must exit at once (a start would serve)."""
    full = dict(
        os.environ,
        ISORUN_STATE_DIR=str(tmp_path / "state"),
        ISORUN_SOCKET=str(tmp_path / "isorund.sock"),
        ISORUN_WARM_START="0",
        **env,
    )
    if "ISORUN_TCP" not in env:
        full.pop("ISORUN_TCP", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "isorun.daemon", *args],
            env=full,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"isorund {args} {env} started (and served) instead of refusing")


def _refused(r: subprocess.CompletedProcess[str], *names: str) -> None:
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("isorund: "), line
    for name in names:
        assert name in line, line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ISORUN_CPU_OVERCOMMIT", "nan"),  # every create was a 500
        ("ISORUN_CPU_OVERCOMMIT", "inf"),
        ("ISORUN_CPU_OVERCOMMIT", "0"),  # every create was 503 "host is full: 0 of 0"
        ("ISORUN_CPU_OVERCOMMIT", "-1"),
        ("ISORUN_MEM_OVERCOMMIT", "nan"),
        ("ISORUN_PRICE_PER_VCPU_HOUR", "nan"),  # every end failed to be stored
        ("ISORUN_PRICE_PER_VCPU_HOUR", "-1"),
        ("ISORUN_DEFAULT_TIMEOUT", "0"),  # every sandbox was reaped at once
        ("ISORUN_DEFAULT_TIMEOUT", "3000000"),  # every create was a 400 about it
        ("ISORUN_DEFAULT_MEMORY_MIB", "0"),
    ],
)
def test_a_setting_out_of_range_is_refused_at_start(tmp_path: Path, name: str, value: str) -> None:
    _refused(_start(tmp_path, [], **{name: value}), name, value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--cpu-overcommit", "nan"), ("--mem-overcommit", "-2"), ("--price-per-vcpu-hour", "inf")],
)
def test_a_flag_out_of_range_is_refused_at_start(tmp_path: Path, flag: str, value: str) -> None:
    # flags were set on the settings after their checks had run
    _refused(_start(tmp_path, [flag, value]), flag, value)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--tcp", "localhost:http"], {}),  # was int()'s ValueError, as a traceback
        (["--tcp", "127.0.0.1:99999"], {}),  # was bind()'s OverflowError
        (["--tcp", "127.0.0.1"], {}),
        ([], {"ISORUN_TCP": "127.0.0.1:-1"}),
    ],
)
def test_a_bad_tcp_address_is_refused_at_start(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    spec = args[1] if args else env["ISORUN_TCP"]
    r = _start(tmp_path, args, **env)
    _refused(r, "--tcp", "ISORUN_TCP", repr(spec), "port")
    assert not (tmp_path / "isorund.sock").exists()
