"""A registry that sends its layers slowly holds no conversion slot while it does: the
store's slots bound unpacking and mkfs (cores, disk), not downloads. Against the loopback
registry behind a proxy that trickles layer bytes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry, assert_store_intact

from isorun.images import ImageStore, StoreConfig


@pytest.fixture
def slow_registry(registry: Registry) -> Iterator[str]:
    """host:port of a proxy to `registry` that sends layer blobs at ~100 bytes/s."""
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._forward(head=False)

        def do_HEAD(self) -> None:
            self._forward(head=True)

        def _forward(self, head: bool) -> None:
            accept = ", ".join(self.headers.get_all("Accept") or [])
            req = urllib.request.Request(
                f"http://{registry.host}{self.path}",
                method="HEAD" if head else "GET",
                headers={"Accept": accept},
            )
            try:
                resp = urllib.request.urlopen(req)
            except urllib.error.HTTPError as exc:
                resp = exc
            body = b"" if head else resp.read()
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.end_headers()
            slow = "/blobs/sha256:" in self.path and len(body) > 1000
            with contextlib.suppress(OSError):  # skopeo killed: the pipe breaks
                for i in range(0, len(body), 10 if slow else len(body) or 1):
                    if stop.is_set():
                        return
                    self.wfile.write(body[i : i + (10 if slow else len(body))])
                    self.wfile.flush()
                    if slow:
                        time.sleep(0.1)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    stop.set()
    server.shutdown()
    server.server_close()


async def test_a_slow_download_does_not_hold_up_other_pulls(
    registry: Registry, slow_registry: str, tmp_path: Path
) -> None:
    big = ob.Layout(tmp_path / "big")
    big.tag(big.manifest([[ob.file("big", os.urandom(50_000))]]), "t")
    small = ob.Layout(tmp_path / "small")
    small.tag(small.manifest([[ob.file("small", "s")]]), "t")
    registry.push(f"oci:{big.path}:t", "slow/big:1")
    registry.push(f"oci:{small.path}:t", "slow/small:1")
    store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None, max_conversions=1))
    hog_phases: list[str] = []
    hog = asyncio.create_task(
        store.ensure(f"{slow_registry}/slow/big:1", progress=lambda e: hog_phases.append(e.phase))
    )
    while "pulling" not in hog_phases:  # the slow pull is downloading (for ~8 minutes)
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    phases: list[str] = []
    try:
        async with asyncio.timeout(30):
            img = await store.ensure(
                f"{registry.host}/slow/small:1", progress=lambda e: phases.append(e.phase)
            )
    except TimeoutError:
        pytest.fail(f"a 1-file image waited 30 s behind a slow download ({phases})")
    finally:
        hog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hog
    assert img.rootfs.is_file() and "waiting" not in phases, phases
    assert [i.digest for i in store.list()] == [img.digest]
    assert_store_intact(store)
