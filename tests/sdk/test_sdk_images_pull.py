"""SDK: Images.pull / AsyncImages.pull and Sandbox(..., on_progress=) against a real daemon
pulling from the loopback registry (one VM boot)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import running_daemon
from pullhelpers import Registry, fold_phases, push_busybox, registry

from isorun import AsyncImages, Images, NotFoundError, PullProgress, Sandbox
from isorun.sdk.errors import ApiError

pytestmark = pytest.mark.vm
__all__ = ["registry"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_daemon(tmp_path_factory.mktemp("isorund-sdk-pull"), own_images=True) as d:
        yield f"unix:{d.sock}"


def test_pull_reports_progress_and_returns_the_image(
    api: str, registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(registry, tmp_path, "sdkpull/bb:v1")
    ref = f"{registry.host}/sdkpull/bb:v1"
    seen: list[PullProgress] = []
    img = Images(api_url=api).pull(ref, on_progress=seen.append)
    assert img["digest"] == digest
    assert fold_phases(seen) == ["resolving", "pulling", "unpacking", "converting", "done"]
    pulling = [e for e in seen if e.phase == "pulling"]
    assert pulling[-1].bytes_total and pulling[-1].bytes_done == pulling[-1].bytes_total
    assert digest in {i["digest"] for i in Images(api_url=api).list()}
    with pytest.raises(ApiError) as err:
        Images(api_url=api).pull("Bad Ref!!")
    assert err.value.code == "invalid_image"
    with pytest.raises(ApiError) as err:
        Images(api_url=api).pull(f"{registry.host}/sdkpull/missing:v1")
    assert "sdkpull/missing" in str(err.value)


async def test_async_pull(api: str, registry: Registry, tmp_path: Path) -> None:
    push_busybox(registry, tmp_path, "sdkpull/async:v1")
    seen: list[PullProgress] = []
    img = await AsyncImages(api_url=api).pull(
        f"{registry.host}/sdkpull/async:v1", on_progress=seen.append
    )
    assert img["digest"].startswith("sha256:") and seen[-1].phase == "done"
    with pytest.raises(NotFoundError):
        await AsyncImages(api_url=api).pull(f"{registry.host}/sdkpull/missing:v1")


def test_sandbox_creation_reports_pull_and_boot(
    api: str, registry: Registry, tmp_path: Path
) -> None:
    push_busybox(registry, tmp_path, "sdkpull/boot:v1", marker="sdk")
    seen: list[PullProgress] = []
    with Sandbox(f"{registry.host}/sdkpull/boot:v1", api_url=api, on_progress=seen.append) as sb:
        assert sb.exec("cat /etc/marker").stdout == "sdk"
    assert fold_phases(seen) == [
        "resolving",
        "pulling",
        "unpacking",
        "converting",
        "done",
        "booting",
    ]
