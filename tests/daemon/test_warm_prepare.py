"""The daemon makes the warm-start template of its default sandbox shape when it starts, so
its first sandbox starts warm instead of waiting for a template boot, and that of any other
shape in the background after its first sandbox, which boots cold meanwhile; stopped while
making one, it leaves no template guest running and no half-made template."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from daemonhelpers import Daemon, ndjson, running_daemon
from vmhelpers import qemu_pids_for

from isorun.vmm import artifacts

pytestmark = pytest.mark.vm


def _wait(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_first_sandbox_starts_from_a_template_made_at_daemon_start(
    tmp_path: Path, busybox_rootfs: Path
) -> None:
    cache = tmp_path / "cache"  # a cache with no template in it yet
    env = {
        "ISORUN_CACHE": str(cache),
        "ISORUN_KERNEL": str(artifacts.kernel_path()),
        "ISORUN_INITRAMFS": str(artifacts.initramfs_path()),
    }
    templates = cache / "warm"

    d = Daemon(tmp_path / "a", ISORUN_DEFAULT_MEMORY_MIB="256", **env).start()
    try:
        # The template guest boots with its placeholder disks under the cache.
        _wait("the template guest", lambda: qemu_pids_for(cache), 60)
    finally:
        d.stop()
    _wait("the template guest to go", lambda: not qemu_pids_for(cache), 10)
    # Nothing half-made is left (on a fast host the template may have been finished).
    left = sorted(p.suffix for p in templates.iterdir())
    assert left in ([".lock"], [".lock", ".vmstate"]), left
    for p in templates.glob("*.vmstate"):
        p.unlink()  # so that daemon b has to make it

    with running_daemon(tmp_path / "b", **env) as d:
        # No sandbox asked for: the daemon makes it by itself.
        _wait("the template", lambda: list(templates.glob("*.vmstate")), 120)
        (template,) = templates.glob("*.vmstate")
        made = template.stat().st_ino
        assert _restored(d, _create(d, busybox_rootfs)), "the first sandbox booted cold"
        assert [p.stat().st_ino for p in templates.glob("*.vmstate")] == [made]
        assert d.log().count("making the template") == 1, d.log()[-3000:]

        # Another shape: its first sandbox boots cold at once (no wait for a template
        # boot), the template is made meanwhile, and the next one of that shape is warm.
        other = {"memory_mib": 320}
        assert not _restored(d, _create(d, busybox_rootfs, **other))
        _wait("the second template", lambda: len(list(templates.glob("*.vmstate"))) == 2, 120)
        assert _restored(d, _create(d, busybox_rootfs, **other))
        assert d.log().count("making the template") == 2, d.log()[-3000:]


def _create(d: Daemon, rootfs: Path, **shape: int) -> str:
    with d.client() as c:
        r = c.post("/v1/sandboxes", json={"image": f"rootfs:{rootfs}", **shape})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _restored(d: Daemon, sandbox: str) -> bool:
    """A restored guest runs with its template's kernel command line, which names no root
    disk (the agent mounts it on request); a cold-booted one names it."""
    with d.client() as c:
        recs = ndjson(c.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "cat /proc/cmdline"}))
    out = b"".join(base64.b64decode(x["data"]) for x in recs if x["type"] == "stdout")
    assert b"console=" in out, recs
    return b"isorun.root=" not in out
