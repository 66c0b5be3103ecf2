"""Built-in templates: definitions as data, digests, and real mmdebstrap builds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from imghelpers import assert_store_intact, ext4_cat, ext4_ls, ext4_stat

from isorun.images import Image, ImageStore, StoreConfig, TemplateError
from isorun.images.templates import TemplateSet


@pytest.mark.no_tools
def test_builtin_definitions() -> None:
    ts = TemplateSet()
    assert {"base", "python", "node"} <= ts.names()
    base, py, node = ts.get("base"), ts.get("python"), ts.get("node")
    for pkg in ("bash", "coreutils", "ca-certificates", "git", "curl"):
        assert pkg in base.packages and pkg in py.packages and pkg in node.packages
    for pkg in (
        "python3",
        "python3-pip",
        "python3-venv",
        "python3-numpy",
        "python3-pandas",
        "python3-scipy",
        "python3-matplotlib",
    ):
        assert pkg in py.packages
    assert {"nodejs", "npm"} <= set(node.packages)
    assert py.env["LANG"] == "C.UTF-8" and py.env["PYTHONUNBUFFERED"] == "1"
    assert py.cmd == ("/usr/bin/python3",) and base.cmd == ("/bin/bash",)
    assert py.working_dir == "/root"
    assert len({base.digest, py.digest, node.digest}) == 3
    assert TemplateSet().get("python").digest == py.digest  # stable across loads


@pytest.mark.no_tools
def test_user_templates_override_and_validate(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('extends = "nope"\n')
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        TemplateSet((tmp_path,)).get("base")
    (tmp_path / "base.toml").write_text('packages = ["bash"]\nfrobnicate = 1\n')
    with pytest.raises(TemplateError, match="frobnicate"):
        TemplateSet((tmp_path,)).get("base")
    (tmp_path / "base.toml").write_text('packages = ["bash"\n')
    with pytest.raises(TemplateError, match="invalid"):
        TemplateSet((tmp_path,)).get("base")
    (tmp_path / "base.toml").write_text('packages = ["Bad Name; rm -rf /"]\n')
    with pytest.raises(TemplateError, match="invalid Debian package name"):
        TemplateSet((tmp_path,)).get("base")
    (tmp_path / "base.toml").write_text('extends = "loop"\n')
    (tmp_path / "loop.toml").write_text('extends = "base"\n')
    with pytest.raises(TemplateError, match="loops"):
        TemplateSet((tmp_path,)).get("base")
    (tmp_path / "loop.toml").unlink()
    (tmp_path / "base.toml").write_text('packages = ["bash", "jq"]\n')
    assert TemplateSet((tmp_path,)).get("base").digest != TemplateSet().get("base").digest
    with pytest.raises(TemplateError, match="unknown template"):
        TemplateSet().get("nonexistent")


def test_base_template(base_image: Image) -> None:
    r = base_image.rootfs
    assert "VERSION_CODENAME=bookworm" in ext4_cat(r, "/usr/lib/os-release")
    for path in (
        "/usr/bin/bash",
        "/usr/bin/git",
        "/usr/bin/curl",
        "/usr/bin/ls",
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        assert ext4_stat(r, path) is not None, path
    assert ext4_ls(r, "/usr/share/man") == []  # path_exclude honoured
    assert base_image.config.env["LANG"] == "C.UTF-8"
    assert base_image.config.working_dir == "/root"


async def test_template_cache_hit_builds_nothing(base_image: Image, tmp_path: Path) -> None:
    # No wall-clock bound here (speed belongs in bench/): a hit converts nothing.
    again = ImageStore(base_image.rootfs.parents[2], StoreConfig(auth_file=None))
    img = await again.ensure("base")
    assert img.digest == base_image.digest and again.stats.conversions == 0
    assert again.inspect("base").digest == img.digest
    assert "template:base" in img.names


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", ["python", "node"])
async def test_big_templates(template_store: ImageStore, name: str) -> None:
    t0 = time.monotonic()
    before = template_store.stats.conversions
    img = await template_store.ensure(name)
    took = time.monotonic() - t0
    built = template_store.stats.conversions > before
    print(
        f"\n[images] template {name}: {took:.1f}s ({'built' if built else 'cached'}), "
        f"{img.content_bytes / 2**20:.0f} MiB content, {img.disk_bytes / 2**20:.0f} MiB disk"
    )
    r = img.rootfs
    if name == "python":
        assert ext4_stat(r, "/usr/bin/python3") is not None
        site = "/usr/lib/python3/dist-packages"
        for mod in ("numpy", "pandas", "scipy", "matplotlib", "pip"):
            assert ext4_stat(r, f"{site}/{mod}/__init__.py") is not None, mod
        assert ext4_stat(r, "/usr/lib/python3.11/venv/__init__.py") is not None
    else:
        assert ext4_stat(r, "/usr/bin/node") is not None
        assert ext4_stat(r, "/usr/bin/npm") is not None
    assert_store_intact(template_store)
