"""POST /v1/images/pull and POST /v1/sandboxes?progress=1 against a real daemon, pulling from
the loopback registry into a fresh image store (one VM boot in this module)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemonhelpers import Daemon, ndjson, running_daemon
from pullhelpers import Registry, auth_registry, fold_phases, ob, push_busybox, registry

pytestmark = pytest.mark.vm
__all__ = ["auth_registry", "registry"]

IMAGE_PHASES = ["resolving", "pulling", "unpacking", "converting", "done"]


@pytest.fixture(scope="module")
def pull_daemon(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Daemon]:
    # API keys may pull from the loopback registry by this one name (the operator's choice)
    with running_daemon(
        tmp_path_factory.mktemp("isorund-pull"),
        own_images=True,
        ISORUN_TENANT_REGISTRIES=f"public,{registry.host}",
    ) as d:
        yield d


def test_pull_streams_phases_then_the_image(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(registry, tmp_path, "dpull/bb:v1")
    ref = f"{registry.host}/dpull/bb:v1"
    with pull_daemon.client() as c:
        r = c.post("/v1/images/pull", json={"image": ref})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        recs = ndjson(r)
        progress = [x for x in recs if x["type"] == "progress"]
        assert fold_phases(progress) == IMAGE_PHASES
        assert all(p["ref"] == ref for p in progress)
        pulls = [p for p in progress if p["phase"] == "pulling"]
        assert pulls[-1]["bytes_done"] == pulls[-1]["bytes_total"] > 0
        assert recs[-1]["type"] == "image" and recs[-1]["image"]["digest"] == digest
        assert ref in recs[-1]["image"]["names"]
        # Cached now: no registry round trip, and the stream says so.
        recs = ndjson(c.post("/v1/images/pull", json={"image": ref}))
        assert fold_phases(x for x in recs if x["type"] == "progress") == ["cached", "done"]
        recs = ndjson(c.post("/v1/images/pull", json={"image": ref, "pull": "always"}))
        assert fold_phases(x for x in recs if x["type"] == "progress") == [
            "resolving",
            "cached",
            "done",
        ]
        assert digest in {i["digest"] for i in c.get("/v1/images").json()["images"]}


def test_pull_bad_refs_give_clear_errors(pull_daemon: Daemon, registry: Registry) -> None:
    with pull_daemon.client() as c:
        # A malformed reference or body is refused before any stream starts.
        r = c.post("/v1/images/pull", json={"image": "Not A Ref!!"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
        assert "Not A Ref!!" in r.json()["error"]["message"]
        for body in ({}, {"image": ""}, {"image": "x", "pull": "sometimes"}, {"image": 1}):
            assert c.post("/v1/images/pull", json=body).status_code == 422, body
        # Missing in the registry: the stream ends with one error record naming the ref.
        ref = f"{registry.host}/dpull/missing:v1"
        recs = ndjson(c.post("/v1/images/pull", json={"image": ref}))
        assert [x["type"] for x in recs] == ["progress", "error"]
        assert recs[0]["phase"] == "resolving"
        assert recs[-1]["code"] in ("not_found", "image_error") and ref in recs[-1]["message"]
        # Registry unreachable.
        recs = ndjson(c.post("/v1/images/pull", json={"image": "127.0.0.1:1/x/y:z"}))
        assert recs[-1]["type"] == "error" and recs[-1]["code"] == "registry_unreachable"
        assert recs[-1]["status"] == 502  # what a plain response would have had


def test_create_with_progress_pulls_then_boots(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    push_busybox(registry, tmp_path, "dpull/boot:v1", marker="from-the-registry")
    ref = f"{registry.host}/dpull/boot:v1"
    with pull_daemon.client() as c:
        r = c.post("/v1/sandboxes", params={"progress": "1"}, json={"image": ref})
        assert r.status_code == 200, r.text
        recs = ndjson(r)
        assert recs[-1]["type"] == "sandbox", recs[-1]
        assert fold_phases(x for x in recs if x["type"] == "progress") == [
            *IMAGE_PHASES,
            "booting",
        ]
        sb = recs[-1]["sandbox"]
        assert sb["state"] == "running" and sb["image"] == ref
        ev = ndjson(c.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "cat /etc/marker"}))
        assert base64.b64decode(ev[1]["data"]) == b"from-the-registry"
        assert c.delete(f"/v1/sandboxes/{sb['id']}").status_code == 200
        # A create that fails on the image: the stream ends with an error record.
        recs = ndjson(
            c.post("/v1/sandboxes?progress=1", json={"image": f"{registry.host}/dpull/nope:v1"})
        )
        assert recs[-1]["type"] == "error" and "dpull/nope" in recs[-1]["message"]


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isorun.cli", *args],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_remove_gc_and_usage(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(registry, tmp_path, "dpull/manage:v1")
    ref = f"{registry.host}/dpull/manage:v1"
    with pull_daemon.client() as c:
        ndjson(c.post("/v1/images/pull", json={"image": ref}))
        info = c.get("/v1/images/inspect", params={"ref": ref}).json()
        assert info["digest"] == digest and info["in_use"] is False
        assert set(info["config"]) == {"env", "working_dir", "user", "entrypoint", "cmd"}
        # no ?ref: a bad query, 400 as the files routes without ?path (docs/api.md)
        for method in ("GET", "DELETE"):
            path = "/v1/images/inspect" if method == "GET" else "/v1/images"
            r = c.request(method, path)
            assert r.status_code == 400 and "?ref=NAME" in r.text, r.text
        missing = c.get("/v1/images/inspect", params={"ref": "localhost:1/none:v1"})
        assert missing.status_code == 404
        r = _cli(pull_daemon, "images", "rm", "localhost:1/none:v1")
        assert r.returncode == 1
        assert "no local image named localhost:1/none:v1 (`isorun images` lists" in r.stderr
        # In use by a sandbox: removal is refused and nothing is lost.
        sb = c.post("/v1/sandboxes", json={"image": ref}).json()
        assert c.get("/v1/images/inspect", params={"ref": ref}).json()["in_use"] is True
        r = c.delete("/v1/images", params={"ref": ref})
        assert r.status_code == 409 and r.json()["error"]["code"] == "image_in_use"
        assert c.get("/v1/images/inspect", params={"ref": ref}).status_code == 200
        assert c.delete(f"/v1/sandboxes/{sb['id']}").status_code == 200
        # Unused now: the CLI removes it and says how much it freed.
        # --json after the action and before REF, as well as before the subcommand
        r = _cli(pull_daemon, "images", "rm", "--json", ref)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["removed"] == digest
        assert c.get("/v1/images/inspect", params={"ref": ref}).status_code == 404
        gc = c.post("/v1/images/gc").json()
        assert gc["freed_bytes"] >= 0 and isinstance(gc["removed"], list)
        du = json.loads(_cli(pull_daemon, "--json", "images", "du").stdout)
        assert du["images"] == len(c.get("/v1/images").json()["images"])
    # Over TCP with a tenant key, store management is the local administrator's.
    with pull_daemon.client() as c:
        key = c.post("/v1/keys", json={"tenant_id": "t-img", "name": "k"}).json()
    with pull_daemon.tcp(key["key"]) as t:
        assert t.post("/v1/images/gc").status_code == 403
        assert t.delete("/v1/images", params={"ref": ref}).status_code == 403


def test_a_daemon_killed_during_a_create_leaves_no_hold_on_its_image(
    registry: Registry, tmp_path: Path
) -> None:
    push_busybox(registry, tmp_path, "dpull/held:v1")
    ref = f"{registry.host}/dpull/held:v1"
    # no warm template being made meanwhile: the kill would leave its guest's run dir
    with running_daemon(tmp_path / "d", own_images=True, ISORUN_WARM_START="0") as d:
        with (
            d.client() as c,
            c.stream("POST", "/v1/sandboxes", params={"progress": "1"}, json={"image": ref}) as r,
        ):
            for line in r.iter_lines():
                if line and json.loads(line).get("phase") == "booting":
                    d.stop(signal.SIGKILL)  # the image is held by now, the VM not booted
                    break
        d.start()
        with d.client() as c:
            rows = c.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"]
            assert [s["state"] for s in rows] == ["ended"], rows
            r = c.delete("/v1/images", params={"ref": ref})
            assert r.status_code == 200, r.text  # was 409 image_in_use, for good


def test_api_keys_cannot_import_host_paths(pull_daemon: Daemon, tmp_path: Path) -> None:
    # The root daemon reads these paths itself: a remote tenant must not pick them.
    with pull_daemon.client() as c:
        key = c.post("/v1/keys", json={"name": "host-paths"}).json()["key"]
    refs = ["oci-layout:/etc/ssl", "oci:/etc/ssl:latest", "docker-archive:/etc/shadow"]
    with pull_daemon.tcp(key) as t:
        for ref in refs:
            for path, body in [
                ("/v1/images/pull", {"image": ref}),
                ("/v1/sandboxes", {"image": ref}),
            ]:
                r = t.post(path, json=body)
                assert r.status_code == 403, (path, ref, r.text)
                msg = r.json()["error"]["message"]
                assert "local administrator" in msg and "unix socket" in msg, msg
                transport = "docker-archive" if "archive" in ref else "oci-layout"
                assert repr(transport) in msg, msg
            assert t.get("/v1/sandboxes").json()["sandboxes"] == []
    # The local administrator may still import one (a missing path is a clear 404)...
    lay = ob.Layout(tmp_path / "admin-layout")
    lay.tag(lay.manifest([ob.busybox_tree([ob.file("etc/marker", "admin's")])]), "v1")
    with pull_daemon.client() as c:
        missing = tmp_path / "no-layout"
        recs = ndjson(c.post("/v1/images/pull", json={"image": f"oci-layout:{missing}"}))
        assert recs[-1]["type"] == "error" and recs[-1]["status"] != 403, recs[-1]
        recs = ndjson(c.post("/v1/images/pull", json={"image": f"oci-layout:{lay.path}:v1"}))
        digest = recs[-1]["image"]["digest"]
        names = [n for i in c.get("/v1/images").json()["images"] for n in i["names"]]
        assert any(str(lay.path) in n for n in names), names
    # ...which tenants do not see: its name is a path on the daemon's host
    with pull_daemon.tcp(key) as t:
        listed = t.get("/v1/images").json()["images"]
        assert digest not in [i["digest"] for i in listed]
        assert not [n for i in listed for n in i["names"] if str(tmp_path) in n], listed
        r = t.get("/v1/images/inspect", params={"ref": f"oci-layout:{lay.path}:v1"})
        assert r.status_code == 403, r.text


def test_a_tenant_pulling_an_image_the_admin_imported_from_a_path_is_not_shown_the_path(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    # One store: the tenant's pull finds the image the administrator imported from a path on
    # the host. Its final record named that path (names and source; and not the name just
    # pulled) while list and inspect left it out.
    lay = ob.Layout(tmp_path / "admin-private-project")
    lay.tag(lay.manifest([ob.busybox_tree([ob.file("etc/marker", "shared")])]), "v1")
    ref = f"{registry.host}/dpull/shared:v1"
    registry.push(f"oci:{lay.path}:v1", "dpull/shared:v1")
    with pull_daemon.client() as c:
        recs = ndjson(c.post("/v1/images/pull", json={"image": f"oci-layout:{lay.path}:v1"}))
        assert str(lay.path) in recs[-1]["image"]["source"], recs[-1]
        key = c.post("/v1/keys", json={"name": "same-image"}).json()["key"]
    with pull_daemon.tcp(key) as t:
        pulled = ndjson(t.post("/v1/images/pull", json={"image": ref}))[-1]
        listed = t.get("/v1/images").json()["images"]
        inspected = t.get("/v1/images/inspect", params={"ref": ref}).json()
    assert pulled["type"] == "image" and pulled["image"]["names"] == [ref], pulled
    assert pulled["image"]["source"] is None, pulled
    for shown in (pulled["image"], *listed, inspected):
        assert str(tmp_path) not in json.dumps(shown), shown
    with pull_daemon.client() as c:  # the administrator still sees where it came from
        admin = c.get("/v1/images/inspect", params={"ref": ref}).json()
        assert str(lay.path) in admin["source"], admin


def test_a_tenant_gets_a_private_image_by_its_digest_only_by_fetching_its_layers(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    # A registry the tenant may use has to serve only the manifest bytes of a private
    # image's digest: the store found that digest converted already and handed the tenant
    # the operator's rootfs without its layers ever being fetched.
    lay = ob.Layout(tmp_path / "operator-only")
    marker = f"the operator's own {tmp_path.name}"  # a layer no other image has
    lay.tag(lay.manifest([ob.busybox_tree([ob.file("etc/marker", marker)])]), "v1")
    with pull_daemon.client() as c:
        recs = ndjson(c.post("/v1/images/pull", json={"image": f"oci-layout:{lay.path}:v1"}))
        digest = recs[-1]["image"]["digest"]
        key = c.post("/v1/keys", json={"name": "manifest-only"}).json()["key"]
    assert registry.push(f"oci:{lay.path}:v1", "dpull/manifest-only:v1") == digest
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{registry.host}/dpull/manifest-only:v1",
        ],
        check=True,
        capture_output=True,
    ).stdout
    for layer in json.loads(raw)["layers"]:
        registry.blob_path(layer["digest"]).unlink()  # the manifest and config stay
    ref = f"{registry.host}/dpull/manifest-only@{digest}"
    with pull_daemon.tcp(key) as t:
        last = ndjson(t.post("/v1/images/pull", json={"image": ref}))[-1]
        assert last["type"] == "error", last
        r = t.post("/v1/sandboxes", json={"image": ref})
        assert r.status_code >= 400, r.text
        rows = t.get("/v1/sandboxes", params={"all": "1"}).json()["sandboxes"]
        assert [row["state"] for row in rows] in ([], ["ended"]), rows
    # with its layers there, the tenant's own pull fetches them and may use the image
    registry.push(f"oci:{lay.path}:v1", "dpull/manifest-only:v1")
    with pull_daemon.tcp(key) as t:
        last = ndjson(t.post("/v1/images/pull", json={"image": ref}))[-1]
        assert last["type"] == "image" and last["image"]["digest"] == digest, last


def test_api_keys_pull_only_from_registries_the_operator_allows(
    pull_daemon: Daemon, registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(registry, tmp_path, "dpull/tenant:v1")
    port = registry.host.rsplit(":", 1)[1]
    refused = [
        f"localhost:{port}/dpull/tenant:v1",  # the same registry by a name not listed
        "169.254.169.254/latest/meta-data:x",  # cloud metadata
        "10.0.0.1:2375/v1/containers:json",  # a private network's docker API
    ]
    with pull_daemon.client() as c:
        key = c.post("/v1/keys", json={"name": "registries"}).json()["key"]
    with pull_daemon.tcp(key) as t:
        for ref in refused:
            host = ref.split("/", 1)[0]
            recs = ndjson(t.post("/v1/images/pull", json={"image": ref}))
            assert [x["type"] for x in recs] == ["error"], recs
            err = recs[0]
            assert (err["status"], err["code"]) == (403, "registry_refused"), err
            assert f"registry {host} is at" in err["message"], err
            assert "ISORUN_TENANT_REGISTRIES" in err["message"], err
            r = t.post("/v1/sandboxes", json={"image": ref})
            assert r.status_code == 403 and r.json()["error"]["code"] == "registry_refused"
        assert t.get("/v1/sandboxes").json()["sandboxes"] == []
        # the registry by the name the operator listed
        recs = ndjson(t.post("/v1/images/pull", json={"image": f"{registry.host}/dpull/tenant:v1"}))
        assert recs[-1]["type"] == "image" and recs[-1]["image"]["digest"] == digest, recs[-1]
    # The local administrator is not limited: the unlisted name pulls.
    with pull_daemon.client() as c:
        recs = ndjson(c.post("/v1/images/pull", json={"image": refused[0]}))
        assert recs[-1]["type"] == "image" and recs[-1]["image"]["digest"] == digest, recs[-1]


def test_api_keys_do_not_get_images_the_daemons_login_fetched(
    auth_registry: Registry, tmp_path: Path
) -> None:
    digest = push_busybox(auth_registry, tmp_path, "operator/secret:v1", marker="op's")
    ref = f"{auth_registry.host}/operator/secret:v1"
    token = base64.b64encode(b"agent:s3cret-pw").decode()
    login = tmp_path / "auth.json"
    login.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    with running_daemon(tmp_path / "d", own_images=True, REGISTRY_AUTH_FILE=str(login)) as d:
        with d.client() as c:  # the operator pulls it with their login
            recs = ndjson(c.post("/v1/images/pull", json={"image": ref}))
            assert recs[-1]["type"] == "image" and recs[-1]["image"]["digest"] == digest
            key = c.post("/v1/keys", json={"name": "tenant"}).json()["key"]
        with d.tcp(key) as t:
            assert digest not in [i["digest"] for i in t.get("/v1/images").json()["images"]]
            assert t.get("/v1/images/inspect", params={"ref": ref}).status_code == 404
            for image in (ref, f"127.0.0.1:1/other/name@{digest}"):
                r = t.post("/v1/sandboxes", json={"image": image})
                assert r.status_code == 403 and r.json()["error"]["code"] == "registry_refused"
            assert t.get("/v1/sandboxes").json()["sandboxes"] == []


def test_a_bad_registry_policy_stops_the_daemon_naming_it(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "isorun.daemon", "--tenant-registries", "public,http://x.io"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ISORUN_STATE_DIR": str(tmp_path), "ISORUN_SOCKET": str(tmp_path / "s")},
    )
    assert res.returncode != 0
    assert "--tenant-registries: 'http://x.io' is not a registry host" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()


def test_a_kill_while_the_image_is_fetched_stops_the_create_at_once(pull_daemon: Daemon) -> None:
    """A DELETE of a sandbox still fetching its image waited for the whole pull or template
    build (minutes; the SDK's destroy gave up after 60 s). Now the create stops there: the
    DELETE answers with nothing billed and the create says it was killed."""
    silent = socket.socket()  # a registry that never answers: the pull would hang for good
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    ref = f"127.0.0.1:{silent.getsockname()[1]}/never/answers:1"
    created: list[httpx.Response] = []

    def create() -> None:
        with pull_daemon.client() as c:
            created.append(c.post("/v1/sandboxes", json={"image": ref}, timeout=120))

    creator = threading.Thread(target=create)
    creator.start()
    try:
        with pull_daemon.client() as c:
            deadline = time.monotonic() + 30
            while not (rows := [s for s in c.get("/v1/sandboxes").json()["sandboxes"]]):
                assert time.monotonic() < deadline, "the create never showed"
                time.sleep(0.05)
            (row,) = rows
            assert row["state"] == "creating"
            r = c.delete(f"/v1/sandboxes/{row['id']}", timeout=30)
            assert r.status_code == 200, r.text
            assert {k: r.json()[k] for k in ("uptime_ms", "billed_seconds", "cost_usd")} == {
                "uptime_ms": 0,
                "billed_seconds": 0,
                "cost_usd": 0,
            }
            creator.join(30)
            assert created and created[0].status_code == 410, created
            assert "was killed while its image" in created[0].text
            ended = c.get(f"/v1/sandboxes/{row['id']}").json()
            assert (ended["state"], ended["end_reason"]) == ("ended", "killed")
            assert c.get("/v1/sandboxes").json()["sandboxes"] == []
            records = c.get("/v1/usage").json()["records"]
            assert [x["sandbox_id"] for x in records].count(row["id"]) == 1
    finally:
        silent.close()
        creator.join(5)
