"""The store knows every login skopeo may use: `skopeo login`/`podman login` ones
($XDG_RUNTIME_DIR/containers/auth.json) and the files skopeo reads by itself beside an
explicit --authfile. An image such a login fetched is the operator's, not every tenant's.
Against a real htpasswd registry on loopback and skopeo's own login command."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import ocibuild as ob
import pytest
from imghelpers import Registry

from isorun.images import (
    ImageStore,
    RegistryAuthError,
    RegistryPolicy,
    RegistryRefusedError,
    StoreConfig,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME with no auth files, and no auth file named by the environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    unset = ("REGISTRY_AUTH_FILE", "XDG_CONFIG_HOME", "DOCKER_CONFIG", "CONTAINERS_REGISTRIES_CONF")
    for var in unset:
        monkeypatch.delenv(var, raising=False)
    return home


def _push(reg: Registry, tmp: Path, repo_tag: str) -> None:
    lay = ob.Layout(tmp / "layout")
    lay.tag(lay.manifest([[ob.file("secret", f"operator-only {repo_tag}")]]), "t")
    reg.push(f"oci:{lay.path}:t", repo_tag)


def _skopeo_login(reg: Registry) -> None:
    assert reg.user and reg.password
    subprocess.run(
        ["skopeo", "login", "--tls-verify=false", "-u", reg.user, "-p", reg.password, reg.host],
        check=True,
        capture_output=True,
    )


async def test_an_image_a_skopeo_login_fetched_is_not_handed_to_tenants(
    auth_registry: Registry, home: Path, tmp_path: Path
) -> None:
    _skopeo_login(auth_registry)
    _push(auth_registry, tmp_path, "private/app:1")
    store = ImageStore(tmp_path / "store", StoreConfig())  # defaults, as isorund uses
    ref = f"{auth_registry.host}/private/app:1"
    img = await store.ensure(ref)  # the operator's pull, with the login
    assert img.private == auth_registry.host
    with pytest.raises(RegistryRefusedError):  # loopback: the tenant may not ask it itself
        await store.ensure(ref, policy=RegistryPolicy.parse("public"))
    named = await store.ensure(ref, policy=RegistryPolicy.parse(auth_registry.host))
    assert named.digest == img.digest


async def test_a_login_the_store_was_not_given_is_not_used(
    auth_registry: Registry, home: Path, tmp_path: Path
) -> None:
    # auth_file=None: no credentials; skopeo must not find the login by itself
    _skopeo_login(auth_registry)
    _push(auth_registry, tmp_path, "private/other:1")
    store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None))
    with pytest.raises(RegistryAuthError):
        await store.ensure(f"{auth_registry.host}/private/other:1")
    assert store.list() == []


@pytest.mark.parametrize("where", [".config/containers/auth.json", ".docker/config.json"])
async def test_a_login_skopeo_reads_beside_the_auth_file_makes_the_image_private(
    auth_registry: Registry, home: Path, tmp_path: Path, where: str
) -> None:
    # skopeo (1.9) reads these even when given --authfile: the store counts them too
    token = base64.b64encode(f"{auth_registry.user}:{auth_registry.password}".encode()).decode()
    login = home / where
    login.parent.mkdir(parents=True)
    login.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    _push(auth_registry, tmp_path, "private/beside:1")
    store = ImageStore(tmp_path / "store", StoreConfig(auth_file=None))
    ref = f"{auth_registry.host}/private/beside:1"
    img = await store.ensure(ref)
    assert img.private == auth_registry.host
    with pytest.raises(RegistryRefusedError):
        await store.ensure(ref, policy=RegistryPolicy.parse("public"))


@pytest.mark.no_tools
def test_the_default_auth_file_is_the_first_of_containers_auth_files(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert StoreConfig().auth_file is None
    docker = home / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text("{}")
    assert StoreConfig().auth_file == docker
    podman = tmp_path / "run" / "containers" / "auth.json"
    podman.parent.mkdir()
    podman.write_text("{}")
    assert StoreConfig().auth_file == podman
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "named.json"))
    assert StoreConfig().auth_file == tmp_path / "named.json"


async def test_an_image_a_registries_conf_credential_helper_fetched_is_not_handed_to_tenants(
    auth_registry: Registry, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential helper set in registries.conf answers skopeo for any registry, whatever
    auth file it is given: what it fetched is the operator's too."""
    assert auth_registry.user and auth_registry.password
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper = helpers / "docker-credential-isorun-test"
    # the docker-credential-helpers protocol: `get`, the server URL on stdin, JSON out
    helper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || exit 1\n'
        "cat > /dev/null\n"
        f'echo \'{{"ServerURL": "{auth_registry.host}", "Username": "{auth_registry.user}", '
        f'"Secret": "{auth_registry.password}"}}\'\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helpers}:{os.environ['PATH']}")
    conf = home / ".config" / "containers" / "registries.conf"  # the user's: skopeo reads it
    conf.parent.mkdir(parents=True)
    conf.write_text('credential-helpers = ["isorun-test"]\n')
    _push(auth_registry, tmp_path, "private/helped:1")
    store = ImageStore(tmp_path / "store", StoreConfig())  # no auth file exists
    img = await store.ensure(f"{auth_registry.host}/private/helped:1")  # the helper answered
    assert img.private == auth_registry.host
    # a registries.conf skopeo cannot be sure of counts too; the default helper does not
    conf.write_text("credential-helpers = [")
    assert StoreConfig().may_hold_credentials_for("registry.example")
    conf.write_text('credential-helpers = ["containers-auth.json"]\n')
    assert not StoreConfig().may_hold_credentials_for("registry.example")
