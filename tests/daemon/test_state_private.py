"""The daemon's state (sandboxes' env, where agents pass API keys, and guest consoles) is
root's alone: no other local user may read it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import running_daemon, sandbox_row

from isorun.daemon.store import SandboxRow, Store

NOBODY = "65534"


def _read_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
    )


def _secret_row(sandbox_id: str) -> SandboxRow:
    return sandbox_row(
        sandbox_id,
        env={"OPENAI_API_KEY": "sk-secret"},
        state="creating",
        created=0.0,
        timeout_s=300,
        expires=300.0,
    )


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may enter (as /var/lib is), unlike pytest's tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="isorun-state-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_another_user_cannot_read_the_state_database(shared: Path) -> None:
    """The state dir was made 0755 and isorund.db* 0644: any local user read every
    sandbox's env secrets from it. An existing 0755 state dir is made private too."""
    state = shared / "state"
    state.mkdir()
    state.chmod(0o755)  # as an older daemon made it
    with running_daemon(shared) as d:
        store = Store(d.state / "isorund.db")  # a row with a secret, as a create stores it
        try:
            store.insert_sandbox(_secret_row("sb-private00000001"))
        finally:
            store.close()
        for name in ("isorund.db", "isorund.db-wal"):
            read = _read_as_nobody(d.state / name)
            assert read.returncode != 0 and "sk-secret" not in read.stdout
            assert "Permission denied" in read.stderr, read.stderr
        assert d.state.stat().st_mode & 0o777 == 0o700


def test_the_database_is_private_in_a_directory_others_may_read(shared: Path) -> None:
    """A state dir the daemon does not make private (a shared, sticky one): the database
    files themselves are the owner's alone, new and existing ones."""
    shared.chmod(0o1777)
    db = shared / "isorund.db"
    store = Store(db)
    try:
        store.insert_sandbox(_secret_row("sb-private00000002"))
    finally:
        store.close()
    db.chmod(0o644)  # as an older daemon left it
    Store(db).close()
    for path in shared.glob("isorund.db*"):
        read = _read_as_nobody(path)
        assert read.returncode != 0 and "Permission denied" in read.stderr, (path, read.stdout)
        assert path.stat().st_mode & 0o777 == 0o600, path
