"""A full disk under the state database: writes get 507, nothing stored is lost."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from daemonhelpers import Daemon, running_daemon


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(root: Path, block: str = "64k") -> Path:
    """A file taking all the room left on root's filesystem."""
    filler = root / "filler"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", f"bs={block}"], capture_output=True, check=False
    )
    return filler


def _write_until_refused(c: httpx.Client) -> httpx.Response:
    """State writes (API keys) until one is refused: the WAL may absorb a few first."""
    r = c.post("/v1/keys", json={"name": "k"})
    for i in range(300):
        if r.status_code != 201:
            break
        r = c.post("/v1/keys", json={"name": f"k{i}" * 20})
    return r


def test_state_disk_full_is_507_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "2m") as root:
        d = Daemon(root)
        try:
            d.start()
            with d.client() as c:
                first = c.post("/v1/keys", json={"name": "before"}).json()
                filler = _fill(root)
                r = _write_until_refused(c)
                assert r.status_code == 507, r.text
                assert "full" in r.json()["error"]["message"]
                filler.unlink()
                names = [k["name"] for k in c.get("/v1/keys").json()["keys"]]
                assert names[0] == "before" and first["id"] in {
                    k["id"] for k in c.get("/v1/keys").json()["keys"]
                }
                assert c.post("/v1/keys", json={"name": "after"}).status_code == 201
        finally:
            d.stop()


def test_a_create_on_a_full_host_disk_is_507_and_names_it(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # The state database fits, a sandbox's scratch disk does not: the host's trouble, not a
    # bad request (it was a 400 "invalid" from the failed cp).
    with _tmpfs(tmp_path / "small", "4m") as root:
        d = Daemon(root, ISORUN_WARM_START="0")
        try:
            d.start()
            with d.client() as c:
                filler = _fill(root)
                os.truncate(filler, filler.stat().st_size - (512 << 10))
                r = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"})
                assert r.status_code == 507, r.text
                assert r.json()["error"]["code"] == "host_disk_full", r.text
                assert "No space left" in r.json()["error"]["message"]
        finally:
            d.stop()


def test_a_sandbox_ended_on_a_full_state_disk_is_recorded_once_there_is_room(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # The DELETE kills the VM, and its end cannot be stored (507): from then on the
    # sandbox shows ended, and its end and usage record are written once space is freed
    # (it showed running, a second DELETE said 'already ended (None)', no usage record).
    # The VM run dirs are on a disk of their own: only the state database's fills.
    with (
        _tmpfs(tmp_path / "small", "32m") as root,
        _tmpfs(root / "state" / "vms", "64m"),
    ):
        d = Daemon(root, ISORUN_WARM_START="0")
        try:
            d.start()
            with d.client() as c:
                image = f"rootfs:{busybox_rootfs}"
                sid = c.post("/v1/sandboxes", json={"image": image, "disk_mib": 64}).json()["id"]
                filler = _fill(root, "4k")
                assert _write_until_refused(c).status_code == 507
                r = c.delete(f"/v1/sandboxes/{sid}")
                assert r.status_code == 507, r.text
                shown = c.get(f"/v1/sandboxes/{sid}").json()
                assert (shown["state"], shown["end_reason"]) == ("ended", "killed"), shown
                assert sid not in {s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}
                ended = shown["ended_at"]
                filler.unlink()
                deadline = time.monotonic() + 10
                while sid not in {r["sandbox_id"] for r in c.get("/v1/usage").json()["records"]}:
                    assert time.monotonic() < deadline, "the end was never stored"
                    time.sleep(0.2)
            d.stop()
            d.start()  # stored, not guessed as lost by the next daemon
            with d.client() as c:
                shown = c.get(f"/v1/sandboxes/{sid}").json()
                assert (shown["state"], shown["end_reason"]) == ("ended", "killed"), shown
                assert shown["ended_at"] == ended  # when it ended, not when that was stored
        finally:
            d.stop()


def test_a_sandbox_ended_while_another_process_locks_the_state_is_recorded_after(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # Another process (an operator's sqlite3 shell, a backup) holds the database's write
    # lock past its 5 s wait: the DELETE kills the VM but cannot store the end. Only a full
    # disk's refusals were kept to store later: this one was dropped, and the sandbox
    # showed running until the next daemon ended it 'lost', billing the time in between.
    with running_daemon(tmp_path / "d", ISORUN_WARM_START="0") as d, d.client() as c:
        sid = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"}).json()["id"]
        other = sqlite3.connect(str(d.state / "isorund.db"), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            r = c.delete(f"/v1/sandboxes/{sid}")
            assert r.status_code == 500 and "locked" in r.text, r.text
            assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "ended"
        finally:
            other.execute("ROLLBACK")
            other.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = (
                sqlite3.connect(str(d.state / "isorund.db"))
                .execute("SELECT state, end_reason, uptime_ms FROM sandboxes WHERE id=?", (sid,))
                .fetchall()
            )
            if rows and rows[0][0] == "ended":
                break
            time.sleep(0.5)
        assert rows[0][:2] == ("ended", "killed") and rows[0][2] > 0, rows
