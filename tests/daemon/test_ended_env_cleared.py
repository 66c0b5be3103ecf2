"""An ended sandbox's env (where agents pass API keys) is not kept in the state database:
a failed create's row used to keep it for good, a cheap way to grow the database, and every
listing parsed it. No VM boots."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, free_port, running_daemon

from isorun.daemon.store import SCHEMA, Store

SECRET = "sk-" + "s" * 30000


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "d", own_images=True, ISORUN_WARM_START="0") as d:
        yield d


def _stored_envs(db: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return dict(c.execute("SELECT id, env FROM sandboxes").fetchall())


def test_a_failed_create_keeps_no_env(fresh: Daemon) -> None:
    # a registry on a closed loopback port: the image fetch fails (5xx), after the row exists
    image = f"127.0.0.1:{free_port()}/nothing:here"
    with fresh.client() as c:
        r = c.post("/v1/sandboxes", json={"image": image, "env": {"OPENAI_API_KEY": SECRET}})
        assert r.status_code >= 500, r.text
        [row] = c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"]
    assert row["state"] == "ended" and row["end_reason"] == "error", row
    assert _stored_envs(fresh.state / "isorund.db") == {row["id"]: "{}"}


def test_an_older_databases_ended_sandboxes_lose_their_env(tmp_path: Path) -> None:
    db = tmp_path / "isorund.db"
    old = sqlite3.connect(db)
    old.executescript(SCHEMA)
    for sid, state in (("sb-ended", "ended"), ("sb-running", "running")):
        old.execute(
            "INSERT INTO sandboxes(id, tenant_id, image, vcpus, memory_mib, disk_mib, env,"
            " metadata, state, created, timeout_s, expires) VALUES"
            " (?, 'local', 'base', 1, 256, 64, ?, '{}', ?, ?, 60, ?)",
            (sid, f'{{"KEY": "{SECRET}"}}', state, time.time(), time.time() + 60),
        )
    old.execute("PRAGMA user_version = 2")  # the daemon before this change
    old.commit()
    old.close()
    Store(db).close()
    envs = _stored_envs(db)
    assert envs["sb-ended"] == "{}"
    assert SECRET in envs["sb-running"]  # a running one's is left as it is
