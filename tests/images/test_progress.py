"""Progress events of `ImageStore.ensure` against the real loopback registry."""

from __future__ import annotations

from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry, assert_store_intact

from isorun.images import ImageError, ImageStore, ProgressEvent


def _push_busybox(registry: Registry, tmp: Path, repo_tag: str) -> str:
    lay = ob.Layout(tmp / "layout")
    lay.tag(lay.manifest([ob.busybox_tree()]), "v1")
    return registry.push(f"oci:{lay.path}:v1", repo_tag)


def _phases(events: list[ProgressEvent]) -> list[str]:
    """Phases in order, with repeated `pulling` byte updates folded into one."""
    out: list[str] = []
    for e in events:
        if not out or out[-1] != e.phase:
            out.append(e.phase)
    return out


async def test_pull_reports_phases_then_cached(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    digest = _push_busybox(registry, tmp_path, "progress/bb:v1")
    ref = f"{registry.host}/progress/bb:v1"
    events: list[ProgressEvent] = []
    img = await store.ensure(ref, progress=events.append)
    assert _phases(events) == ["resolving", "pulling", "unpacking", "converting", "done"]
    assert all(e.ref == ref for e in events)
    pulls = [e for e in events if e.phase == "pulling"]
    total = pulls[0].bytes_total
    assert total and total > 0 and all(e.bytes_total == total for e in pulls)
    assert pulls[0].bytes_done == 0 and pulls[-1].bytes_done == total
    done = [e.bytes_done for e in pulls]
    assert done == sorted(done)  # never goes backwards
    assert events[-1].digest == digest == img.digest
    assert events[-1].to_json()["phase"] == "done"
    # Again: a cached tag needs no registry round trip and says so.
    events.clear()
    await store.ensure(ref, progress=events.append)
    assert _phases(events) == ["cached", "done"]
    # pull="always" re-resolves, then finds the digest cached.
    events.clear()
    await store.ensure(ref, pull="always", progress=events.append)
    assert _phases(events) == ["resolving", "cached", "done"]
    assert_store_intact(store)


async def test_failed_pull_ends_without_done(store: ImageStore, registry: Registry) -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(ImageError):
        await store.ensure(f"{registry.host}/progress/missing:v1", progress=events.append)
    assert _phases(events) == ["resolving"]


async def test_broken_progress_callback_does_not_fail_the_pull(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    _push_busybox(registry, tmp_path, "progress/bb2:v1")

    def boom(ev: ProgressEvent) -> None:
        raise RuntimeError("renderer crashed")

    img = await store.ensure(f"{registry.host}/progress/bb2:v1", progress=boom)
    assert img.rootfs.is_file()
