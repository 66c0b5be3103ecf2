"""A full disk under the state database: writes get 507, nothing stored is lost."""

from __future__ import annotations

import os
import subprocess
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
