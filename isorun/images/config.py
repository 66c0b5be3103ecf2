"""The image config a sandbox honours, and the store's own settings."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isorun.images.errors import ImageCorruptError
from isorun.images.registries_conf import credential_helpers_set

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GiB = 1 << 30
# well under the agent's 64 KiB frame, which also carries the working dir and user
MAX_ENV_BYTES = 32 * 1024
# ... and those two: a path the kernel takes (PATH_MAX), a user name or uid:gid
MAX_WORKING_DIR_BYTES = 4096
MAX_USER_BYTES = 256


@dataclass(frozen=True)
class ImageConfig:
    """What exec needs from an image: env, working dir, user, entrypoint and cmd."""

    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    working_dir: str = "/"
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def from_oci(cls, cfg: dict[str, Any]) -> ImageConfig:
        """Build from the `config` object of an OCI/Docker image config blob.

        The blob comes from the image, so it is untrusted: a field of the wrong type raises
        ImageCorruptError naming it (an Entrypoint string is not split into characters)."""
        env: dict[str, str] = {}
        for item in _strings(cfg, "Env"):
            if "=" in item:
                k, v = item.split("=", 1)
                if not k:
                    raise ImageCorruptError(
                        f"image config field Env has an entry with no name ({_short(item)}); "
                        "the image is malformed"
                    )
                env[k] = v
        env.setdefault("PATH", DEFAULT_PATH)
        size = len(json.dumps(env))
        if size > MAX_ENV_BYTES:
            # it is sent to the guest agent in one frame on every sandbox boot
            raise ImageCorruptError(
                f"image config field Env is {size} bytes, over the limit of {MAX_ENV_BYTES}; "
                "move the large values into files in the image"
            )
        working_dir = _string(cfg, "WorkingDir") or "/"
        if not working_dir.startswith("/"):
            raise ImageCorruptError(
                f"image config field WorkingDir must be an absolute path, not "
                f"{_short(working_dir)}; the image is malformed"
            )
        user = _string(cfg, "User") or "root"
        # sent with Env in that one frame: one too long failed every boot of a stored image
        for key, value, most in (
            ("WorkingDir", working_dir, MAX_WORKING_DIR_BYTES),
            ("User", user, MAX_USER_BYTES),
        ):
            if len(value.encode()) > most:
                raise ImageCorruptError(
                    f"image config field {key} is {len(value.encode())} bytes, over the limit "
                    f"of {most}; the image is malformed"
                )
        return cls(
            env=env,
            working_dir=working_dir,
            user=user,
            entrypoint=_strings(cfg, "Entrypoint"),
            cmd=_strings(cfg, "Cmd"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "env": dict(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageConfig:
        return cls(
            env=dict(d["env"]),
            working_dir=d["working_dir"],
            user=d["user"],
            entrypoint=list(d["entrypoint"]),
            cmd=list(d["cmd"]),
        )


def _strings(cfg: dict[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ImageCorruptError(
            f"image config field {key} must be a list of strings, not {_short(value)}; "
            "the image is malformed"
        )
    for x in value:
        _no_nul(key, x)
    return list(value)


def _no_nul(key: str, value: str) -> None:
    """NUL cannot be in an argv, env entry, path or user name: the guest would cut it there."""
    if "\x00" in value:
        raise ImageCorruptError(
            f"image config field {key} holds a NUL character ({_short(value)}); the image is "
            "malformed"
        )


def _string(cfg: dict[str, Any], key: str) -> str:
    value = cfg.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageCorruptError(
            f"image config field {key} must be a string, not {_short(value)}; the image is "
            "malformed"
        )
    _no_nul(key, value)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Credentials:
    """Per-call registry credentials (username + password or token)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class Anonymous:
    """Pull offering no credentials at all: neither per-call ones nor the auth file's."""


ANONYMOUS = Anonymous()
# Who a pull authenticates as: given credentials, nobody, or (None) the auth file's.
PullCredentials = Credentials | Anonymous | None


@dataclass(frozen=True)
class AuthCandidate:
    """A file skopeo may take registry credentials from. `legacy`: ~/.dockercfg's format
    (registries at the top level, no "auths")."""

    path: Path
    legacy: bool = False


def auth_candidates() -> list[AuthCandidate]:
    """The auth files skopeo (containers/image) looks at, in containers-auth.json(5)'s order,
    whether or not they exist."""
    home = Path.home()
    out: list[AuthCandidate] = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(AuthCandidate(Path(env)))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    primary = Path(runtime) / "containers" if runtime else Path(f"/run/containers/{os.getuid()}")
    out.append(AuthCandidate(primary / "auth.json"))
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    out.append(AuthCandidate(config_home / "containers" / "auth.json"))
    docker = Path(os.environ.get("DOCKER_CONFIG") or home / ".docker")
    out.append(AuthCandidate(docker / "config.json"))
    out.append(AuthCandidate(home / ".dockercfg", legacy=True))
    return out


def _default_auth_file() -> Path | None:
    """The file skopeo would take first: $REGISTRY_AUTH_FILE, else the first that exists
    (~/.dockercfg's older format cannot be given as --authfile; skopeo reads it by itself)."""
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(env)
    return next((c.path for c in auth_candidates() if not c.legacy and c.path.exists()), None)


_DOCKER_HUB_KEYS = ("index.docker.io", "registry-1.docker.io")


def _auth_key_host(key: str) -> str:
    """The registry an auth file key names ("https://index.docker.io/v1/" → index.docker.io)."""
    return key.lower().split("://", 1)[-1].split("/", 1)[0]


def _file_may_hold(auth: AuthCandidate, registry: str) -> bool:
    """Whether one auth file may give credentials for `registry` (see may_hold_credentials_for)."""
    try:
        doc = json.loads(auth.path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # there, but unreadable to us: skopeo may read it
    if not isinstance(doc, dict):
        return True
    if doc.get("credsStore") or doc.get("credHelpers"):
        return True
    auths = doc if auth.legacy else doc.get("auths") or {}
    if not isinstance(auths, dict):
        return True
    want = registry.lower()
    aliases = {want, *(_DOCKER_HUB_KEYS if want == "docker.io" else ())}
    return any(_auth_key_host(k) in aliases for k in auths)


def _loopback(registry: str) -> bool:
    """Whether `registry` is this host's loopback by its very name: localhost, ::1 or an
    address in 127.0.0.0/8 (127.example.com is anyone's name, and gets TLS checked)."""
    host = registry.lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port or v4:port
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StoreConfig:
    """Settings of an `ImageStore`.

    auth_file: docker `config.json`-format credentials, always given to skopeo as --authfile
      (an empty one when None). Default: the first of containers-auth.json(5)'s files there
      is ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
      ~/.config/containers/auth.json, ~/.docker/config.json), so `skopeo login`, `podman
      login` and `docker login` all count.
    max_image_bytes: refuse images whose layers or unpacked tree exceed this.
    max_image_files: refuse images whose unpacked tree has more inodes than this (files,
      directories, links; an image of empty files costs the host inodes, not bytes). Debian
      with a full toolchain is ~100k, a big node_modules a few 100k.
    insecure_registries: hosts reached over plain HTTP / unverified TLS; loopback registries
      are always allowed, as Docker does.
    max_conversions: images unpacked and converted (or templates built) at once by this store
      object (each takes a core and disk bandwidth for seconds to minutes; more wait, saying
      so). Downloads do not count: a slow registry would hold a slot doing nothing.
    """

    auth_file: Path | None = field(default_factory=_default_auth_file)
    max_image_bytes: int = 20 * GiB
    max_image_files: int = 2_000_000
    insecure_registries: frozenset[str] = frozenset()
    platform_os: str = "linux"
    platform_arch: str = "amd64"
    pull_timeout_s: float = 1800.0
    max_conversions: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    template_dirs: tuple[Path, ...] = ()
    debian_mirror: str = field(
        default_factory=lambda: os.environ.get(
            "ISORUN_DEBIAN_MIRROR", "http://deb.debian.org/debian"
        )
    )
    debian_security_mirror: str = field(
        default_factory=lambda: os.environ.get(
            "ISORUN_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
        )
    )

    def may_hold_credentials_for(self, registry: str) -> bool:
        """Whether skopeo may find credentials for `registry` in auth_file or in any other
        auth file it reads by itself (skopeo 1.9 reads ~/.docker/config.json and
        ~/.config/containers/auth.json even beside an explicit --authfile): an unreadable
        file, a credential store or helper (in an auth file or registries.conf), which may
        answer for any registry, says yes."""
        files = [AuthCandidate(self.auth_file)] if self.auth_file is not None else []
        files += [c for c in auth_candidates() if c.path != self.auth_file]
        return any(_file_may_hold(c, registry) for c in files) or credential_helpers_set()

    def is_insecure(self, registry: str) -> bool:
        return registry in self.insecure_registries or _loopback(registry)
