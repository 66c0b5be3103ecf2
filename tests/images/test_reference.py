"""Reference parsing: Docker Hub defaults, registries, digests, templates, offline forms."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from isorun.images import InvalidReferenceError, StoreConfig, parse_reference

pytestmark = pytest.mark.no_tools
D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("python:3.12", "docker.io/library/python:3.12"),
        ("python", "docker.io/library/python:latest"),
        ("acme/env", "docker.io/acme/env:latest"),
        ("docker.io/python:3", "docker.io/library/python:3"),
        ("index.docker.io/library/python:3", "docker.io/library/python:3"),
        (f"ghcr.io/acme/agent-env@{D}", f"ghcr.io/acme/agent-env@{D}"),
        (f"ghcr.io/acme/agent-env:1.0@{D}", f"ghcr.io/acme/agent-env@{D}"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost/x:y", "localhost/x:y"),
        ("127.0.0.1:5000/a/b/c:v1.2-rc_3", "127.0.0.1:5000/a/b/c:v1.2-rc_3"),
        ("docker://quay.io/x/y:z", "quay.io/x/y:z"),
    ],
)
def test_registry_refs(ref: str, name: str) -> None:
    assert parse_reference(ref).name() == name


def test_templates_win_for_bare_names_only() -> None:
    t = frozenset({"python", "base"})
    assert parse_reference("python", t).transport == "template"
    assert parse_reference("python:3.12", t).transport == "registry"
    assert parse_reference("docker.io/library/python", t).transport == "registry"
    assert parse_reference("template:node").name() == "template:node"


def test_offline_refs() -> None:
    r = parse_reference("oci-layout:/srv/img:v1")
    assert (r.transport, r.path, r.tag) == ("oci-layout", Path("/srv/img"), "v1")
    assert r.skopeo() == "oci:/srv/img:v1"
    r = parse_reference("oci-layout:/srv/img")
    assert (r.path, r.tag) == (Path("/srv/img"), None)
    r = parse_reference("docker-archive:/tmp/x.tar")
    assert r.skopeo() == "docker-archive:/tmp/x.tar"


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "  ",
        "UPPER/case",
        "python:",
        "python:-bad",
        "x@sha256:123",
        "x@md5:" + "a" * 32,
        "a b",
        "oci-layout:relative/dir",
        "docker-archive:x.tar",
        "template:../etc",
        "x" * 5000,
        "repo//double",
        "python:" + "t" * 200,
        "bad\x00byte",
    ],
)
def test_invalid_refs(ref: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(ref)


@pytest.mark.parametrize(
    "registry", ["example.com:0", "example.com:65536", "[::1]:99999999999999999999"]
)
def test_a_port_out_of_range_is_an_invalid_reference_naming_it(registry: str) -> None:
    # one reached getaddrinfo, which overflowed (a 500 from the daemon)
    port = registry.rsplit(":", 1)[1]
    with pytest.raises(InvalidReferenceError, match=f"port {port} is not in 1-65535"):
        parse_reference(f"{registry}/x:1")
    assert parse_reference("example.com:65535/x").registry == "example.com:65535"


@given(st.text(max_size=80))
def test_parser_never_crashes(ref: str) -> None:
    try:
        r = parse_reference(ref)
    except InvalidReferenceError:
        return
    assert r.name()


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.3.2.1", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("127.example.com", False),  # a name anyone may register: TLS stays checked
        ("127.0.0.1.nip.io.example.org:443", False),
        ("10.0.0.1:5000", False),
        ("[fe80::1]:5000", False),
    ],
)
def test_only_loopback_addresses_and_localhost_skip_tls(registry: str, loopback: bool) -> None:
    cfg = StoreConfig(auth_file=None)
    assert cfg.is_insecure(parse_reference(f"{registry}/x:1").registry) is loopback
    assert StoreConfig(auth_file=None, insecure_registries=frozenset({registry})).is_insecure(
        registry
    )
