"""scripts/install-deps.sh against a private apt configuration: the real apt-cache and
apt-config read it, `apt-get install` runs as apt's own simulation (-s), and `apt-get
update` reuses the lists this host already fetched. Nothing on the host changes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
HOST_LISTS = Path("/var/lib/apt/lists")
BOOKWORM = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
BACKPORTS = BOOKWORM.replace("bookworm bookworm-updates", "bookworm-backports")
# bookworm's golang-go: too old to parse guest/agent/go.mod, let alone build it
OLD_GO = """#!/bin/sh
case "$1" in
env) echo go1.19.8 ;;
version) echo "go version go1.19.8 linux/amd64" ;;
*) echo "go: errors parsing go.mod: invalid go version '1.26.0'" >&2; exit 1 ;;
esac
"""
# apt-get as this test lets it act: update is a no-op (lists come from the host), install
# is simulated; "installing" golang-go puts the host's real Go where a package would
APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$ISORUN_TEST_LOG"
case " $* " in *" update "*) exit 0 ;; esac
/usr/bin/apt-get -s "$@" > /dev/null || exit $?
case " $* " in *" golang-go "*) ln -sf "$ISORUN_TEST_REAL_GO" "$ISORUN_TEST_NEW_GO/go" ;; esac
"""


def _stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _real_go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    assert Path(go).is_file(), "this test needs a Go >= 1.21 on the host (make deps)"
    return go


def _sandbox(tmp: Path, sources_list: str, parts: dict[str, str], old_go: bool) -> dict[str, str]:
    """An environment for install-deps.sh: private apt config, stubs first on PATH."""
    if not list(HOST_LISTS.glob("*bookworm-backports*Packages*")):
        pytest.fail("this host has no bookworm-backports lists: run scripts/install-deps.sh")
    etc, lists, cache = tmp / "etc", tmp / "lists", tmp / "cache"
    (etc / "sources.list.d").mkdir(parents=True)
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    (etc / "sources.list").write_text(sources_list)
    (etc / "sources.list.d" / "debian.sources").write_text(BOOKWORM)
    for name, text in parts.items():
        (etc / "sources.list.d" / name).write_text(text)
    for f in HOST_LISTS.iterdir():
        if f.is_file() and f.name != "lock":
            (lists / f.name).symlink_to(f)
    conf = tmp / "apt.conf"
    conf.write_text(
        f'Dir::Etc::SourceList "{etc}/sources.list";\n'
        f'Dir::Etc::SourceParts "{etc}/sources.list.d";\n'
        f'Dir::State::Lists "{lists}";\nDir::Cache "{cache}";\nDebug::NoLocking "1";\n'
    )
    stubs, new_go = tmp / "stubs", tmp / "usr-bin"
    stubs.mkdir()
    new_go.mkdir()
    _stub(stubs / "apt-get", APT_GET)
    _stub(stubs / "systemctl", "#!/bin/sh\nexit 3\n")  # docker-registry: not running
    if old_go:
        _stub(stubs / "go", OLD_GO)
    return {
        **os.environ,
        "APT_CONFIG": str(conf),
        "PATH": f"{stubs}:{new_go}:/usr/sbin:/usr/bin:/sbin:/bin",
        "ISORUN_TEST_LOG": str(tmp / "apt.log"),
        "ISORUN_TEST_NEW_GO": str(new_go),
        "ISORUN_TEST_REAL_GO": _real_go(),
        "ISORUN_CACHE": str(tmp / "isorun-cache"),
    }


def _install_deps(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPTS / "install-deps.sh"], env=env, capture_output=True, text=True, timeout=240
    )


def test_an_old_go_on_path_gets_a_new_one_installed_and_the_guest_builds(
    tmp_path: Path,
) -> None:
    env = _sandbox(tmp_path, "", {"backports.sources": BACKPORTS}, old_go=True)
    result = _install_deps(env)
    assert result.returncode == 0, result.stderr
    # the build picks the new Go although the old one is still first on PATH
    build = subprocess.run(
        [SCRIPTS / "build-initramfs.sh"], env=env, capture_output=True, text=True, timeout=240
    )
    assert build.returncode == 0, build.stderr
    assert Path(build.stdout.strip()).stat().st_size > 1_000_000


def test_backports_mentioned_only_in_a_comment_or_an_ignored_file_is_added(
    tmp_path: Path,
) -> None:
    commented = "# deb http://deb.debian.org/debian bookworm-backports main\n"
    disabled = {"backports.list.disabled": commented.lstrip("# ")}
    env = _sandbox(tmp_path, commented, disabled, old_go=False)
    result = _install_deps(env)
    assert result.returncode == 0, result.stderr
    added = tmp_path / "etc" / "sources.list.d" / "isorun-backports.sources"
    assert "Suites: bookworm-backports" in added.read_text()
    log = (tmp_path / "apt.log").read_text()
    assert "-t bookworm-backports qemu-system-x86" in log


def test_backports_already_enabled_adds_no_second_source(tmp_path: Path) -> None:
    env = _sandbox(tmp_path, "", {"backports.sources": BACKPORTS}, old_go=False)
    result = _install_deps(env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "etc" / "sources.list.d" / "isorun-backports.sources").exists()
