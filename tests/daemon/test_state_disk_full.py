"""A full disk under the state database: writes get 507, nothing stored is lost."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from daemonhelpers import Daemon


def test_state_disk_full_is_507_and_keeps_what_was_stored(tmp_path: Path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)
    d = Daemon(root)
    try:
        d.start()
        with d.client() as c:
            first = c.post("/v1/keys", json={"name": "before"}).json()
            filler = root / "filler"
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
            )
            r = None
            for i in range(200):  # the WAL may absorb a few writes before the disk says no
                r = c.post("/v1/keys", json={"name": f"k{i}" * 20})
                if r.status_code != 201:
                    break
            assert r is not None and r.status_code == 507, r.text
            assert "full" in r.json()["error"]["message"]
            filler.unlink()
            names = [k["name"] for k in c.get("/v1/keys").json()["keys"]]
            assert names[0] == "before" and first["id"] in {
                k["id"] for k in c.get("/v1/keys").json()["keys"]
            }
            assert c.post("/v1/keys", json={"name": "after"}).status_code == 201
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_create_on_a_full_host_disk_is_507_and_names_it(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # The state database fits, a sandbox's scratch disk does not: the host's trouble, not a
    # bad request (it was a 400 "invalid" from the failed cp).
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
    d = Daemon(root, ISORUN_WARM_START="0")
    try:
        d.start()
        with d.client() as c:
            filler = root / "filler"
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
            )
            os.truncate(filler, filler.stat().st_size - (512 << 10))
            r = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}"})
            assert r.status_code == 507, r.text
            assert r.json()["error"]["code"] == "host_disk_full", r.text
            assert "No space left" in r.json()["error"]["message"]
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_sandbox_ended_on_a_full_state_disk_is_recorded_once_there_is_room(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    # The DELETE kills the VM, and its end cannot be stored (507): from then on the
    # sandbox shows ended, and its end and usage record are written once space is freed
    # (it showed running, a second DELETE said 'already ended (None)', no usage record).
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(root)], check=True)
    vms = root / "state" / "vms"
    vms.mkdir(parents=True)
    # the VM run dirs on a disk of their own: only the state database's fills
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(vms)], check=True)
    d = Daemon(root, ISORUN_WARM_START="0")
    try:
        d.start()
        with d.client() as c:
            r = c.post("/v1/sandboxes", json={"image": f"rootfs:{busybox_rootfs}", "disk_mib": 64})
            sid = r.json()["id"]
            filler = root / "filler"
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False
            )
            for i in range(300):  # the WAL may absorb a few writes before the disk says no
                if c.post("/v1/keys", json={"name": f"k{i}" * 20}).status_code == 507:
                    break
            r = c.delete(f"/v1/sandboxes/{sid}")
            assert r.status_code == 507, r.text
            shown = c.get(f"/v1/sandboxes/{sid}").json()
            assert (shown["state"], shown["end_reason"]) == ("ended", "killed"), shown
            assert sid not in {s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]}
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
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(vms)], check=False)
        subprocess.run(["umount", "-l", str(root)], check=False)
