"""An auto-started daemon runs as root: it must import only the installed isorun and its
dependencies, never a module that happens to lie in the caller's working directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stop(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_autostart_does_not_import_from_the_callers_directory(tmp_path: Path) -> None:
    """`python -m isorun.daemon` put the caller's cwd first on sys.path: a uvicorn.py that
    another user planted in a shared directory (/tmp, a checkout) ran as root in isorund."""
    cwd = tmp_path / "shared"
    cwd.mkdir()
    marker = tmp_path / "imported"
    (cwd / "uvicorn.py").write_text(
        f"open({str(marker)!r}, 'w').write(str(__import__('os').getpid()))\n"
        "raise ImportError('the planted uvicorn.py ran')\n"
    )
    state = tmp_path / "state"
    env = dict(
        os.environ,
        # relative: the caller's, though the daemon runs elsewhere
        ISORUN_SOCKET="../auto.sock",
        ISORUN_STATE_DIR="../state",
        ISORUN_WARM_START="0",
        ISORUN_AUTOSTART="1",
    )
    for name in ("ISORUN_API_URL", "ISORUN_TCP"):
        env.pop(name, None)
    code = "from isorun import Sandbox; print(len(Sandbox.list()))"
    try:
        # -P: the client itself does not look in its cwd; only the daemon could
        on = subprocess.run(
            [sys.executable, "-P", "-c", code],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert not marker.exists(), "the daemon imported uvicorn.py from the caller's cwd"
        assert on.returncode == 0, on.stderr
        assert on.stdout.strip() == "0"
        pid = int((state / "isorund.pid").read_text())
        # nor does it keep the caller's directory (busy, unmountable) for its whole life
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        _stop(state / "isorund.pid")
