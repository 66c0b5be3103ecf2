"""The stdin of foreground execs waits in the daemon until their commands read it (a
command is fed only as fast as it reads): the daemon bounds it, all sandboxes together, and
an exec past the bound is refused, naming it, instead of the daemon growing until the OOM
killer ends every tenant's sandboxes."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, ndjson, running_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_rootfs: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("isorund"), ISORUN_HELD_STDIN_MIB="2") as d:
        yield d


def _stdin(mib: float) -> str:
    return base64.b64encode(b"x" * int(mib * (1 << 20))).decode()


def test_stdin_no_command_has_read_is_bounded_and_freed_when_it_ends(
    daemon: Daemon, sandbox: str
) -> None:
    exec_url = f"/v1/sandboxes/{sandbox}/exec"
    started = threading.Event()

    def slow_reader() -> None:  # reads none of its 1.5 MiB for 3 s, then all of it
        with (
            daemon.client() as c,
            c.stream("POST", exec_url, json={"cmd": "sleep 3; wc -c", "stdin": _stdin(1.5)}) as r,
        ):
            lines = r.iter_lines()
            assert '"start"' in next(lines)
            started.set()
            assert any('"exit"' in line for line in lines)

    with daemon.client() as c:
        r = c.post(
            exec_url, json={"cmd": "cat > /dev/null", "background": True, "open_stdin": True}
        )
        background = r.json()["proc_id"]
    waiting = threading.Thread(target=slow_reader)
    waiting.start()
    try:
        assert started.wait(30)
        with daemon.client() as c:
            # another exec's stdin, and a write to another process's, would pass the bound
            for r in (
                c.post(exec_url, json={"cmd": "wc -c", "stdin": _stdin(1)}),
                c.post(
                    f"/v1/sandboxes/{sandbox}/processes/{background}/stdin",
                    content=b"x" * (1 << 20),
                ),
            ):
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert err["code"] == "capacity" and "ISORUN_HELD_STDIN_MIB" in err["message"]
                assert "at most 2 MiB" in err["message"]
    finally:
        waiting.join(60)
    with daemon.client() as c:  # the first command ended: its stdin no longer counts
        records = ndjson(c.post(exec_url, json={"cmd": "wc -c", "stdin": _stdin(1)}))
        assert base64.b64decode(records[1]["data"]).strip() == str(1 << 20).encode()
