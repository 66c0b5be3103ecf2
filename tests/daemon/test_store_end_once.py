"""A sandbox ends once: a second end (from a second process on the same state, or a retry)
neither rewrites its end nor bills it again (real SQLite, no VM)."""

from __future__ import annotations

import time
from pathlib import Path

from daemonhelpers import sandbox_row

from isorun.daemon.store import SandboxRow, Store


def _running(store: Store) -> SandboxRow:
    now = time.time()
    row = sandbox_row(
        "sb-once", tenant_id="t1", vcpus=2, created=now - 10, expires=now + 50, started=now - 9
    )
    store.insert_sandbox(row)
    return row


def test_a_second_end_keeps_the_first_and_bills_once(tmp_path: Path) -> None:
    path = tmp_path / "isorund.db"
    first, second = Store(path), Store(path)  # two processes' views of one state
    row = _running(first)
    stale = second.get_sandbox(row.id)
    assert stale is not None and stale.state == "running"
    bill = first.end_sandbox(row, "killed", (1200, 300 << 20, 9_500), 0.041)
    assert bill == {"billed_seconds": 10, "cost_usd": round(10 * 2 * 0.041 / 3600, 9)}

    again = second.end_sandbox(stale, "lost", (5, 5, 70_000), 0.041)
    assert again == bill  # the first end's record, not a second one
    assert (stale.state, stale.end_reason, stale.uptime_ms) == ("ended", "killed", 9_500)
    stored = first.get_sandbox(row.id)
    assert stored is not None and (stored.end_reason, stored.cpu_ms) == ("killed", 1200)
    records = first.usage("t1", None, None)["records"]
    assert [(r["sandbox_id"], r["uptime_ms"]) for r in records] == [("sb-once", 9_500)]
    first.close()
    second.close()
