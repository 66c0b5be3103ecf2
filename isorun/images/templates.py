"""Built-in templates: Debian root filesystems described as data (TOML) and built by mmdebstrap.

A template's digest is the hash of its fully resolved definition (after `extends`), so an
edited definition is a new image and an unchanged one is a cache hit with no network.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from isorun.images import proc
from isorun.images.config import DEFAULT_PATH, ImageConfig, StoreConfig
from isorun.images.errors import StoreFullError, TemplateError

BUILDER_VERSION = 2  # bump when build_rootfs changes what it makes from the same definition
# mmdebstrap copies the building host's /etc/hostname and /etc/resolv.conf into the tree: a
# template would carry that host's name and DNS server, and differ between hosts. The guest's
# hostname is the agent's (pid1.go); a sandbox has no network to resolve names on.
_HOST_NEUTRAL = 'echo isorun > "$1/etc/hostname" && : > "$1/etc/resolv.conf"'
_PKG = r"^[a-z0-9][a-z0-9+.-]+$"


class TemplateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


class TemplateDef(BaseModel):
    """One `templates/<name>.toml` file."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    extends: str | None = None
    suite: str | None = None
    variant: str | None = None
    components: list[str] | None = None
    packages: list[str] = Field(default_factory=list)
    path_exclude: list[str] = Field(default_factory=list)
    path_include: list[str] = Field(default_factory=list)
    config: TemplateConfig = Field(default_factory=TemplateConfig)


class Template(BaseModel):
    """A resolved template: everything the build depends on."""

    model_config = ConfigDict(frozen=True)
    name: str
    description: str
    suite: str
    variant: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    path_exclude: tuple[str, ...]
    path_include: tuple[str, ...]
    env: dict[str, str]
    working_dir: str
    user: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]

    @property
    def digest(self) -> str:
        body = self.model_dump(exclude={"name", "description"})
        body["builder"] = BUILDER_VERSION
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(canon).hexdigest()

    @property
    def config(self) -> ImageConfig:
        return ImageConfig(
            env=dict(self.env),
            working_dir=self.working_dir,
            user=self.user,
            entrypoint=list(self.entrypoint),
            cmd=list(self.cmd),
        )


def _builtin_dir() -> Path:
    return Path(str(resources.files("isorun") / "templates"))


class TemplateSet:
    """Template definitions from the built-in dir, overridden by `StoreConfig.template_dirs`."""

    def __init__(self, dirs: tuple[Path, ...] = ()) -> None:
        self._files: dict[str, Path] = {}
        for d in (_builtin_dir(), *dirs):
            if d.is_dir():
                for f in sorted(d.glob("*.toml")):
                    self._files[f.stem] = f

    def names(self) -> frozenset[str]:
        return frozenset(self._files)

    def _load(self, name: str) -> TemplateDef:
        path = self._files.get(name)
        if path is None:
            raise TemplateError(
                f"unknown template {name!r}; known: {', '.join(sorted(self._files)) or 'none'}"
            )
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
            return TemplateDef.model_validate(data)
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise TemplateError(f"template file {path} is invalid: {exc}") from exc

    def get(self, name: str) -> Template:
        chain: list[TemplateDef] = []
        seen: list[str] = []
        cur: str | None = name
        while cur is not None:
            if cur in seen:
                raise TemplateError(
                    f"template {name!r}: 'extends' loops through {' -> '.join([*seen, cur])}"
                )
            seen.append(cur)
            d = self._load(cur)
            chain.append(d)
            cur = d.extends
        chain.reverse()  # root first
        packages: list[str] = []
        env: dict[str, str] = {"PATH": DEFAULT_PATH}
        merged: dict[str, Any] = {
            "suite": "bookworm",
            "variant": "minbase",
            "components": ["main"],
            "working_dir": "/",
            "user": "root",
            "entrypoint": [],
            "cmd": [],
        }
        excl: list[str] = []
        incl: list[str] = []
        for d in chain:
            for key in ("suite", "variant", "components"):
                if getattr(d, key) is not None:
                    merged[key] = getattr(d, key)
            packages += [p for p in d.packages if p not in packages]
            excl += [p for p in d.path_exclude if p not in excl]
            incl += [p for p in d.path_include if p not in incl]
            env.update(d.config.env)
            for key in ("working_dir", "user", "entrypoint", "cmd"):
                if getattr(d.config, key) is not None:
                    merged[key] = getattr(d.config, key)
        for p in packages:
            if not re.match(_PKG, p):
                raise TemplateError(f"template {name!r}: invalid Debian package name {p!r}")
        return Template(
            name=name,
            description=chain[-1].description,
            suite=merged["suite"],
            variant=merged["variant"],
            components=tuple(merged["components"]),
            packages=tuple(packages),
            path_exclude=tuple(excl),
            path_include=tuple(incl),
            env=env,
            working_dir=merged["working_dir"],
            user=merged["user"],
            entrypoint=tuple(merged["entrypoint"]),
            cmd=tuple(merged["cmd"]),
        )


async def build_rootfs(t: Template, target: Path, cfg: StoreConfig, tmp: Path) -> None:
    """Run mmdebstrap to build template `t` into the (new) directory `target`."""
    comps = " ".join(t.components)
    sources = [
        f"deb {cfg.debian_mirror} {t.suite} {comps}",
        f"deb {cfg.debian_mirror} {t.suite}-updates {comps}",
        f"deb {cfg.debian_security_mirror} {t.suite}-security {comps}",
    ]
    argv = [
        "mmdebstrap",
        "--quiet",
        f"--variant={t.variant}",
        "--mode=root",
        '--aptopt=Acquire::Retries "3"',
        f"--include={','.join(t.packages)}",
        f"--customize-hook={_HOST_NEUTRAL}",
    ]
    argv += [f"--dpkgopt=path-exclude={p}" for p in t.path_exclude]
    argv += [f"--dpkgopt=path-include={p}" for p in t.path_include]
    argv += [t.suite, str(target), *sources]
    res = await proc.run(argv, timeout=cfg.pull_timeout_s, env={"TMPDIR": str(tmp)})
    if res.returncode != 0:
        low = res.stderr.lower()
        if "no space left on device" in low:
            raise StoreFullError(
                f"disk full while building template {t.name!r}: free space and retry"
            )
        raise TemplateError(
            f"building template {t.name!r} with mmdebstrap failed (check the "
            f"package names and that {cfg.debian_mirror} is reachable, or set "
            f"ISORUN_DEBIAN_MIRROR): {proc.tail(res.stderr, 8)}"
        )
