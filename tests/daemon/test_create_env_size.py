"""A create whose env would not fit in the one request the guest agent is sent it in is a
422 naming `env` before any VM boots: no sandbox, no usage record, nothing billed. (It used
to boot the VM, then fail with a 413 about a 'set_defaults' request, and bill it.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, running_daemon
from pullhelpers import ob

from isorun.agent.frames import MAX_PAYLOAD
from isorun.images.config import DEFAULT_PATH, MAX_ENV_BYTES


@pytest.fixture
def fresh(tmp_path: Path, busybox_rootfs: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path / "d", own_images=True, ISORUN_WARM_START="0") as d:
        yield d


def _refused_naming_env(d: Daemon, body: dict[str, object]) -> str:
    with d.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/sandboxes", json=body)
        took = time.monotonic() - t0
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid"
        assert c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"] == []
        assert c.get("/v1/usage").json()["records"] == []
    assert took < 10, f"{took:.1f}s: a VM was booted first"
    msg = str(r.json()["error"]["message"])
    assert "env" in msg, msg
    return msg


def test_an_env_too_big_for_the_agent_is_refused_before_a_boot(
    fresh: Daemon, busybox_rootfs: Path
) -> None:
    # within the per-value limit (65536) and the 1 MiB body, over the agent's 64 KiB frame
    msg = _refused_naming_env(
        fresh, {"image": f"rootfs:{busybox_rootfs}", "env": {"BIG": "x" * 65536}}
    )
    assert str(MAX_ENV_BYTES) in msg, msg


def test_an_env_that_fits_alone_but_not_with_the_images_is_refused_before_a_boot(
    fresh: Daemon, tmp_path: Path
) -> None:
    # each within its own limit (32 KiB): the two together are over the agent's frame
    lay = ob.Layout(tmp_path / "layout")
    image_env = {"IMAGE_BIG": "y" * (MAX_ENV_BYTES - 110), "PATH": DEFAULT_PATH}
    assert len(json.dumps(image_env)) <= MAX_ENV_BYTES  # as the image store measures it
    config = {"Env": [f"{k}={v}" for k, v in image_env.items()]}
    lay.tag(lay.manifest([ob.busybox_tree()], config=config), "v1")
    env = {"MINE": "z" * (MAX_ENV_BYTES - 11)}
    assert len(json.dumps(env, separators=(",", ":"))) <= MAX_ENV_BYTES
    # what the agent would be sent after the boot: over its one frame
    defaults = {"op": "set_defaults", "env": {**image_env, **env}, "cwd": "/", "user": "root"}
    assert len(json.dumps(defaults, separators=(",", ":"))) > MAX_PAYLOAD
    msg = _refused_naming_env(fresh, {"image": f"oci-layout:{lay.path}:v1", "env": env})
    assert "image's own env" in msg, msg
