"""An API key's image pulls against a real daemon and the loopback registry, with the
default tenant policy (`public`: the loopback registry is not one an API key may name).
No VM boots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonhelpers import Daemon, ndjson, running_daemon
from pullhelpers import Registry, ob, registry

__all__ = ["registry"]


@pytest.fixture(scope="module")
def daemon_public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("isorund-images")
    with running_daemon(root, own_images=True, ISORUN_TENANT_REGISTRIES="public") as d:
        yield d


def _key(d: Daemon, tenant: str) -> str:
    with d.client() as c:
        r = c.post("/v1/keys", json={"tenant_id": tenant, "name": "k"})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


def test_a_stored_image_is_refused_under_a_registry_the_key_may_not_name(
    daemon_public: Daemon, registry: Registry, tmp_path: Path
) -> None:
    lay = ob.Layout(tmp_path / "l")
    lay.tag(lay.manifest([[ob.file("hello", "hi")]]), "t")
    registry.push(f"oci:{lay.path}:t", "dimages/app:1")
    with daemon_public.client() as c:  # the local administrator pulls it
        recs = ndjson(c.post("/v1/images/pull", json={"image": f"{registry.host}/dimages/app:1"}))
        digest = recs[-1]["image"]["digest"]
    with daemon_public.tcp(_key(daemon_public, "t-a")) as t:
        for ref in (
            "10.1.2.3:5000/prod/payments:1",  # by tag: not stored
            f"10.1.2.3:5000/prod/payments@{digest}",  # by digest: stored
            f"{registry.host}/dimages/app:1",  # by the name it is stored under
        ):
            last = ndjson(t.post("/v1/images/pull", json={"image": ref}))[-1]
            assert last["type"] == "error" and last["code"] == "registry_refused", (ref, last)
            r = t.post("/v1/sandboxes", json={"image": ref})
            assert r.status_code == 403, (ref, r.text)
            assert r.json()["error"]["code"] == "registry_refused"
    with daemon_public.tcp(_key(daemon_public, "t-b")) as t:
        names = [i["names"] for i in t.get("/v1/images").json()["images"] if i["digest"] == digest]
        assert names == [[f"{registry.host}/dimages/app:1"]]


def test_a_port_out_of_range_is_a_400_naming_it(daemon_public: Daemon) -> None:
    ref = "registry.example.invalid:99999999999999999999/x:1"
    with daemon_public.tcp(_key(daemon_public, "t-port")) as t:
        for path in ("/v1/images/pull", "/v1/sandboxes"):
            r = t.post(path, json={"image": ref})
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_image" and "not in 1-65535" in err["message"], err
        assert t.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"] == []
        assert t.get("/v1/usage").json()["records"] == []
