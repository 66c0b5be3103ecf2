"""State database: a database from before `proc_stdin` opens, gains the table once
(idempotently), and keeps every row it had; what it keeps per ended sandbox is bounded (no
VM, no daemon)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

from daemonhelpers import sandbox_row

from isorun.daemon.store import SCHEMA, SCHEMA_VERSION, SandboxRow, Store


def _old_database(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)  # the first release's schema; user_version 0
    db.execute(
        "INSERT INTO sandboxes(id, tenant_id, image, vcpus, memory_mib, disk_mib, env, metadata,"
        " state, created, timeout_s, expires) VALUES"
        " ('sb-old', 'local', 'base', 1, 256, 64, '{}', '{}', 'running', ?, 60, ?)",
        (time.time(), time.time() + 60),
    )
    db.commit()
    db.close()


def _running(sandbox_id: str) -> SandboxRow:
    return sandbox_row(sandbox_id)


def test_old_database_is_migrated_idempotently(tmp_path: Path) -> None:
    path = tmp_path / "isorund.db"
    _old_database(path)
    st = Store(path)
    assert st.schema_version == SCHEMA_VERSION
    row = st.get_sandbox("sb-old")
    assert row is not None and row.state == "running"
    st.add_stdin_proc("sb-old", "p1")
    # an old database keeps what an ending sandbox printed, like a new one
    st.insert_sandbox(dataclasses.replace(row, id="sb-new"))
    st.end_sandbox(dataclasses.replace(row, id="sb-new"), "killed", (1, 2, 3), 0.0, console="bye\n")
    st.close()
    # Opening again (and again) changes nothing and keeps the new rows.
    for _ in range(2):
        st = Store(path)
        assert st.schema_version == SCHEMA_VERSION
        assert st.has_stdin_proc("sb-old", "p1") and not st.has_stdin_proc("sb-old", "p2")
        st.close()
    # A crash between a migration step and the version bump: the step runs again, harmlessly.
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()
    st = Store(path)
    assert st.schema_version == SCHEMA_VERSION and st.has_stdin_proc("sb-old", "p1")
    assert st.console("sb-new") == "bye\n" and st.console("sb-old") == ""


def test_stdin_rows_closed_and_dropped_with_their_sandbox(tmp_path: Path) -> None:
    st = Store(tmp_path / "isorund.db")
    row = _running("sb-1")
    st.insert_sandbox(row)
    st.add_stdin_proc("sb-1", "p1")
    st.add_stdin_proc("sb-1", "p2")
    st.drop_stdin_proc("sb-1", "p1")
    assert not st.has_stdin_proc("sb-1", "p1") and st.has_stdin_proc("sb-1", "p2")
    st.end_sandbox(row, "killed", (0, 0, 1000), 0.041)
    assert not st.has_stdin_proc("sb-1", "p2")


def test_only_the_newest_consoles_are_kept(tmp_path: Path) -> None:
    """Each ended sandbox keeps up to 64 KiB of console: only the newest `kept_consoles`
    are kept, so a busy daemon's database stops growing; every usage record stays."""
    st = Store(tmp_path / "isorund.db", kept_consoles=2)
    for i in range(4):
        row = _running(f"sb-{i}")
        st.insert_sandbox(row)
        st.end_sandbox(row, "killed", (1, 2, 3), 0.0, console=f"console {i}\n")
    assert [st.console(f"sb-{i}") for i in range(4)] == ["", "", "console 2\n", "console 3\n"]
    assert st.usage("local", None, None)["total"]["sandboxes"] == 4
