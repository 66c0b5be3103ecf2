"""A pull made on someone else's behalf reaches only the registries its policy allows, and
offers the store's credentials only to registries the policy names: against real registries
on loopback and on a public address in a network namespace of our own."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import PublicRegistries, Registry, assert_store_intact

from isorun.errors import ConfigError
from isorun.images import (
    ImageError,
    ImageStore,
    RegistryAuthError,
    RegistryPolicy,
    RegistryRefusedError,
    RegistryUnreachableError,
    StoreConfig,
    parse_reference,
    registry_policy,
)


def _push(reg: Registry, tmp: Path, repo_tag: str) -> str:
    """An image of its own (a marker file names it: the same content is one digest)."""
    lay = ob.Layout(tmp / repo_tag.replace("/", "_").replace(":", "_"))
    lay.tag(lay.manifest([ob.busybox_tree([ob.file("etc/marker", repo_tag)])]), "t")
    return reg.push(f"oci:{lay.path}:t", repo_tag)


def _store_with_login(tmp: Path, mp: pytest.MonkeyPatch, *registries: Registry) -> ImageStore:
    """A store whose operator keeps the agent login for `registries` where skopeo also looks
    by itself ($REGISTRY_AUTH_FILE): an anonymous pull must keep skopeo from using it too."""
    token = base64.b64encode(b"agent:s3cret-pw").decode()
    tmp.mkdir(exist_ok=True)
    auth = tmp / "config.json"
    auth.write_text(json.dumps({"auths": {r.host: {"auth": token} for r in registries}}))
    mp.setenv("REGISTRY_AUTH_FILE", str(auth))
    cfg = StoreConfig(insecure_registries=frozenset(r.host for r in registries))
    assert cfg.auth_file == auth
    return ImageStore(tmp / "store", cfg)


@pytest.mark.no_tools
@pytest.mark.parametrize(
    "ref",
    [
        "127.0.0.1:5000/x",
        "localhost:5000/x",  # a name: refused for the address it resolves to
        "10.1.2.3:2375/x",
        "192.168.1.1/x",
        "169.254.169.254/latest",  # cloud metadata
        "100.64.0.1/x",  # carrier-grade NAT
        "0.0.0.0:5000/x",
        "[::1]:5000/x",
        "[fd00::1]/x",
        "[fe80::1]/x",
        # IPv6 carrying a private IPv4 address, which a NAT64 or 6to4 gateway takes it to
        "[64:ff9b::a00:5]/x",
        "[2002:a00:5::1]/x",
        "[::ffff:0:a00:5]/x",
    ],
)
async def test_public_only_refuses_registries_on_private_addresses(ref: str) -> None:
    policy = RegistryPolicy.parse("public")
    with pytest.raises(RegistryRefusedError, match=r"not (a )?public"):
        await policy.check(parse_reference(ref))


@pytest.mark.no_tools
async def test_a_refusal_does_not_tell_the_tenant_where_a_name_resolves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An internal DNS name's private address is the operator's to know: the refusal says
    # what kind of address it is, the daemon's log says which.
    policy = RegistryPolicy.parse("public")
    with pytest.raises(RegistryRefusedError) as err:
        await policy.check(parse_reference("localhost:5000/x"))
    assert "is at an address that is not public" in str(err.value)
    assert "127.0.0.1" not in str(err.value) and "::1" not in str(err.value)
    assert any(
        "localhost" in r.getMessage() and ("127.0.0.1" in r.getMessage() or "::1" in r.getMessage())
        for r in caplog.records
    )
    # an address the tenant wrote is named back
    with pytest.raises(RegistryRefusedError, match=r"is at 10\.1\.2\.3, which is not a public"):
        await policy.check(parse_reference("10.1.2.3:2375/x"))


@pytest.mark.no_tools
async def test_named_registries_are_allowed_whatever_their_address_and_case() -> None:
    policy = RegistryPolicy.parse(" Registry.Internal:5000 , 127.0.0.1:5000")
    assert policy == RegistryPolicy(False, frozenset({"registry.internal:5000", "127.0.0.1:5000"}))
    assert await policy.check(parse_reference("127.0.0.1:5000/x")) == "operator"
    assert await policy.check(parse_reference("registry.internal:5000/a/b:1")) == "operator"
    # not public: anything not named is refused without being looked up
    with pytest.raises(RegistryRefusedError, match=r"allowed: 127\.0\.0\.1:5000,registry"):
        await policy.check(parse_reference("127.0.0.1:5001/x"))
    with pytest.raises(RegistryRefusedError, match=r"allowed: \(none\)"):
        await RegistryPolicy.parse("").check(parse_reference("45.67.89.2/x"))
    # a public address literal under `public`: allowed, anonymously
    assert await RegistryPolicy.parse("public").check(parse_reference("45.67.89.2/x")) == (
        "anonymous"
    )


@pytest.mark.no_tools
@pytest.mark.parametrize("entry", ["http://x.io", "a b", "registry", "x.io/repo", "docker.io:x"])
def test_a_bad_policy_entry_is_a_config_error_naming_it(entry: str) -> None:
    with pytest.raises(ConfigError, match=f"ISORUN_X: {entry!r} is not a registry host"):
        RegistryPolicy.parse(f"public,{entry}", "ISORUN_X")


async def test_a_refused_registry_is_not_asked_and_nothing_is_stored(
    registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    _push(registry, tmp_path, "policy/refused:1")
    ref = f"{registry.host}/policy/refused:1"
    events: list[str] = []
    with pytest.raises(RegistryRefusedError, match=f"registry {registry.host} is at 127.0.0.1"):
        await store.ensure(
            ref, policy=RegistryPolicy.parse("public"), progress=lambda e: events.append(e.phase)
        )
    assert events == [] and store.list() == []
    assert_store_intact(store)
    # the same registry named by the policy: pulled
    named = RegistryPolicy.parse(f"public,{registry.host}")
    assert (await store.ensure(ref, policy=named)).digest == registry.digest("policy/refused:1")
    # once stored, a policy that refuses the registry is still refused: by tag or digest
    digest = registry.digest("policy/refused:1")
    for again in (ref, f"{registry.host}/policy/refused@{digest}"):
        with pytest.raises(RegistryRefusedError, match=f"registry {registry.host}"):
            await store.ensure(again, policy=RegistryPolicy.parse(""))


async def test_a_stored_image_gets_no_name_under_a_registry_the_policy_refuses(
    registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    _push(registry, tmp_path, "policy/stored:1")
    img = await store.ensure(f"{registry.host}/policy/stored:1")  # the operator's pull
    nobody = RegistryPolicy.parse("")
    for i in range(3):
        with pytest.raises(RegistryRefusedError, match=r"registry 10\.0\.0\.5:5000 is not one"):
            await store.ensure(f"10.0.0.5:5000/made-up-{i}@{img.digest}", policy=nobody)
    # a registry the policy names: handed out, but a digest no registry was asked about
    # adds no name (refs.json is not the tenant's to grow)
    named = RegistryPolicy.parse("registry.example.com")
    got = await store.ensure(f"registry.example.com/made-up@{img.digest}", policy=named)
    assert got.digest == img.digest
    assert store.inspect(img.digest).names == (f"{registry.host}/policy/stored:1",)


async def test_a_stored_image_is_served_without_waiting_on_dns(
    registry: Registry, store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An offline host, or a resolver that does not answer (10 s a lookup): a stored image
    # the policy admits is served at once, as before, under no new name; a pull is not.
    _push(registry, tmp_path, "policy/offline:1")
    img = await store.ensure(f"{registry.host}/policy/offline:1")  # the operator's pull
    public = RegistryPolicy.parse("public")
    real_resolve = registry_policy.resolve

    async def unanswered(host: str, port: int) -> list[str]:
        await asyncio.sleep(30)
        return await real_resolve(host, port)

    monkeypatch.setattr(registry_policy, "resolve", unanswered)
    async with asyncio.timeout(5):
        got = await store.ensure(f"registry.invalid/offline@{img.digest}", policy=public)
    assert got.digest == img.digest
    monkeypatch.setattr(registry_policy, "resolve", real_resolve)
    assert store.inspect(img.digest).names == (f"{registry.host}/policy/offline:1",)
    with pytest.raises(RegistryUnreachableError, match=r"cannot resolve host registry\.invalid"):
        await store.ensure("registry.invalid/offline:2", policy=public)


async def test_public_registries_are_pulled_anonymously_and_named_ones_with_the_login(
    public_registries: PublicRegistries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = public_registries
    open_digest = _push(pub.open, tmp_path, "tenant/open:1")
    private_digest = _push(pub.auth, tmp_path, "operator/private:1")
    store = _store_with_login(tmp_path, monkeypatch, pub.open, pub.auth)
    public = RegistryPolicy.parse("public")
    # A public registry that serves anyone: a tenant's pull works.
    img = await store.ensure(f"{pub.open.host}/tenant/open:1", policy=public)
    assert img.digest == open_digest
    # One that wants a login the operator has: the tenant's pull does not get to spend it.
    private = f"{pub.auth.host}/operator/private:1"
    with pytest.raises(RegistryAuthError):
        await store.ensure(private, policy=public)
    assert [i.digest for i in store.list()] == [open_digest]
    # The operator names that registry: now its pulls use the login.
    named = RegistryPolicy.parse(f"public,{pub.auth.host}")
    assert (await store.ensure(private, policy=named)).digest == private_digest
    # The operator themself (no policy) always pulls with their login.
    other = _store_with_login(tmp_path / "admin", monkeypatch, pub.auth)
    assert (await other.ensure(private)).digest == private_digest


async def test_an_image_the_operators_login_fetched_goes_only_to_policies_naming_its_registry(
    registry: Registry, auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_digest = _push(auth_registry, tmp_path, "operator/secret:1")
    open_digest = _push(registry, tmp_path, "team/open:1")
    store = _store_with_login(tmp_path / "op", monkeypatch, auth_registry)
    # the operator's own pulls: one with their login, one from a registry it has none for
    secret = await store.ensure(f"{auth_registry.host}/operator/secret:1")
    assert secret.private == auth_registry.host
    assert (await store.ensure(f"{registry.host}/team/open:1")).private == ""
    public = RegistryPolicy.parse("public")
    # Stored, but not handed to a policy that may not name its registry: by its name, nor by
    # its digest under another registry's name (both loopback here, so refused outright).
    for ref in [
        f"{auth_registry.host}/operator/secret:1",
        f"127.0.0.1:1/any/name@{private_digest}",
    ]:
        with pytest.raises(RegistryRefusedError):
            await store.ensure(ref, policy=public)
    named = RegistryPolicy.parse(f"public,{auth_registry.host}")
    assert (
        await store.ensure(f"{auth_registry.host}/operator/secret:1", policy=named)
    ).digest == private_digest
    # what no login fetched is anyone's whose policy admits the name, from the store,
    # without asking the registry (this one does not even hold it)
    opened = await store.ensure(f"{auth_registry.host}/any/name@{open_digest}", policy=named)
    assert opened.digest == open_digest
    # Images stored before images were marked: judged by where they came from, as a pull
    # from there would be now (the login for auth_registry is still the store's).
    for img in store.list():
        meta_file = img.rootfs.parent / "image.json"
        meta = json.loads(meta_file.read_text())
        del meta["private"]
        meta_file.write_text(json.dumps(meta))
    assert {i.digest: i.private for i in store.list()} == {
        private_digest: auth_registry.host,
        open_digest: "",
    }
    with pytest.raises(RegistryRefusedError):
        await store.ensure(f"{auth_registry.host}/operator/secret:1", policy=public)


@pytest.fixture
def host_service() -> Iterator[tuple[int, list[str]]]:
    """An HTTP service of this host's, on every interface: its port, and the paths it was
    asked for (what a pull sent there would have reached)."""
    asked: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], asked
    server.shutdown()
    server.server_close()


async def test_a_public_registry_cannot_send_a_tenants_pull_elsewhere(
    public_registries: PublicRegistries, host_service: tuple[int, list[str]], tmp_path: Path
) -> None:
    # skopeo follows a registry's token realm (and redirects) by itself: the registry, not
    # the tenant's reference, picks where those requests go.
    pub, (port, asked) = public_registries, host_service
    store = ImageStore(
        tmp_path / "store",
        StoreConfig(auth_file=None, insecure_registries=frozenset({pub.hostile})),
    )
    ref, public = f"{pub.hostile}/x/y:1", RegistryPolicy.parse("public")
    for realm, refused in [
        (f"http://127.0.0.1:{port}/token", None),  # the pull's own loopback: nothing there
        (f"http://localhost:{port}/token", None),
        (f"http://{pub.host_side}:{port}/token", "this host's own address"),
        (f"http://10.0.0.1:{port}/token", "10.0.0.1, which is not a public address"),
    ]:
        pub.send_elsewhere(realm)
        with pytest.raises(ImageError) as err:
            await store.ensure(ref, policy=public)
        if refused:
            assert isinstance(err.value, RegistryRefusedError), err.value
            assert "the registry sent the pull on to" in str(err.value)
            assert refused in str(err.value)
    assert asked == [] and store.list() == []
    # Without a policy (the operator's own pull) the same registry gets the host to ask its
    # service: what the confinement above stopped.
    pub.send_elsewhere(f"http://{pub.host_side}:{port}/token")
    with pytest.raises(ImageError):
        await store.ensure(ref)
    assert asked and asked[0].startswith("/token?")
