"""The guest build scripts against a private cache: old builds leave it (every agent or
kernel change builds anew under a new hash, and without pruning the cache grew by a kernel
or an initramfs per change), and what they cache is what the key says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
PRUNE = SCRIPTS / "prune-guest-builds.sh"


def _env(cache: Path | str, **extra: str) -> dict[str, str]:
    # /usr/local/go/bin: where `make` finds Go too (the Makefile puts it on PATH)
    path = f"{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/local/go/bin"
    return {**os.environ, "PATH": path, "ISORUN_CACHE": str(cache), **extra}


def _seed_kernel(cache: Path) -> None:
    """A placeholder for the kernel this checkout builds: building one takes minutes."""
    key = subprocess.run(
        [SCRIPTS / "build-kernel.sh", "--key"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (cache / "kernel" / key).mkdir(parents=True)
    (cache / "kernel" / key / "vmlinux").write_bytes(b"placeholder")


def _cpio_names(cpio: Path) -> list[str]:
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=cpio.open("rb"), capture_output=True, check=True
    )
    return listing.stdout.decode().split()


def _builds(root: Path, count: int) -> list[Path]:
    """count build dirs, oldest first, a minute apart."""
    now = time.time()
    builds = []
    for i in range(count):
        build = root / f"{i:016x}"
        build.mkdir(parents=True)
        (build / "initramfs.cpio").write_bytes(b"cpio")
        os.utime(build, (now - 60 * (count - i), now - 60 * (count - i)))
        builds.append(build)
    return builds


def test_the_build_in_use_and_the_three_newest_others_are_kept(tmp_path: Path) -> None:
    builds = _builds(tmp_path / "initramfs", 7)
    in_use = builds[0] / "initramfs.cpio"  # the oldest: a user switched back to it
    result = subprocess.run([PRUNE, tmp_path / "initramfs", in_use], capture_output=True)
    assert result.returncode == 0, result.stderr
    left = sorted(p.name for p in (tmp_path / "initramfs").iterdir())
    assert left == sorted(b.name for b in [builds[0], *builds[-3:]])
    assert in_use.read_bytes() == b"cpio"


def test_nothing_to_prune_is_fine(tmp_path: Path) -> None:
    builds = _builds(tmp_path / "kernel", 2)
    result = subprocess.run([PRUNE, tmp_path / "kernel", builds[1] / "vmlinux"])
    assert result.returncode == 0
    assert sorted((tmp_path / "kernel").iterdir()) == builds
    absent = subprocess.run([PRUNE, tmp_path / "none", tmp_path / "none" / "x"])
    assert absent.returncode == 0


def test_a_relative_cache_gets_links_that_resolve_and_an_initramfs_with_init(
    tmp_path: Path,
) -> None:
    _seed_kernel(tmp_path / "rel")
    result = subprocess.run(
        [SCRIPTS / "build-guest.sh"],
        cwd=tmp_path,
        env=_env("rel"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    guest = tmp_path / "rel" / "guest"
    for name in ("vmlinux", "initramfs.cpio"):
        target = Path(os.readlink(guest / name))
        assert target.is_absolute() and target.is_file(), f"{name} -> {target}"
    assert "init" in _cpio_names(guest / "initramfs.cpio")


def _init_machine(cpio: Path, tmp: Path) -> int:
    """e_machine of the initramfs's /init: 0x3e x86-64, 0xb7 arm64."""
    tmp.mkdir()
    subprocess.run(["cpio", "-i", "--quiet", "init"], cwd=tmp, stdin=cpio.open("rb"), check=True)
    return int.from_bytes((tmp / "init").read_bytes()[18:20], "little")


def test_an_arm64_agent_is_cached_apart_from_the_amd64_one(tmp_path: Path) -> None:
    def build(**extra: str) -> Path:
        result = subprocess.run(
            [SCRIPTS / "build-initramfs.sh"],
            env=_env(tmp_path / "cache", **extra),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return Path(result.stdout.strip())

    arm64 = build(GOARCH="arm64")
    amd64 = build(GOARCH="")
    assert arm64 != amd64
    assert _init_machine(arm64, tmp_path / "arm64") == 0xB7
    assert _init_machine(amd64, tmp_path / "amd64") == 0x3E


def test_builds_of_the_same_agent_at_once_all_succeed(tmp_path: Path) -> None:
    """Two CI jobs (or `make guest` twice) on one machine: they shared one temp name."""
    for round_ in range(6):
        env = _env(tmp_path / f"cache{round_}")
        builds = [
            subprocess.Popen(
                [SCRIPTS / "build-initramfs.sh"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        results = [(b.wait(timeout=300), *b.communicate()) for b in builds]
        for code, out, err in results:
            assert code == 0, err
            assert "init" in _cpio_names(Path(out.strip()))


def test_test_sessions_building_the_busybox_rootfs_at_once_all_get_a_clean_image(
    tmp_path: Path,
) -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    code = f"import sys; sys.path.insert(0, {str(tests_dir)!r}); import vmhelpers; "
    code += "print(vmhelpers.build_busybox_rootfs())"
    for round_ in range(4):
        env = _env(tmp_path / f"cache{round_}")
        sessions = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for s in sessions:
            out, err = s.communicate(timeout=120)
            assert s.returncode == 0, err
            image = out.strip().splitlines()[-1]  # mkfs may talk on stdout too
            fsck = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
            assert fsck.returncode == 0, fsck.stdout
        left = [p.name for p in (tmp_path / f"cache{round_}" / "test-rootfs").iterdir()]
        assert left == [Path(image).name]


def _checkout(tmp: Path, name: str) -> Path:
    """A copy of what building the guest and a test session booting it need."""
    tree = tmp / name
    for part in ("scripts", "guest"):
        shutil.copytree(REPO / part, tree / part)
    (tree / "tests").mkdir()
    for helper in ("conftest.py", "vmhelpers.py"):
        shutil.copy(REPO / "tests" / helper, tree / "tests" / helper)
    return tree


WHICH = """import os
from isorun.vmm import artifacts

def test_which() -> None:
    print("BOOTS", os.path.realpath(artifacts.initramfs_path()))
"""


def test_each_checkouts_tests_boot_the_agent_it_built(tmp_path: Path) -> None:
    """Two checkouts (two CI jobs: main and a branch changing the agent) on one machine."""
    a, b = _checkout(tmp_path, "a"), _checkout(tmp_path, "b")
    with (b / "guest" / "agent" / "main.go").open("a") as f:
        f.write("\n// the branch's change\n")
    cache = tmp_path / "cache"
    _seed_kernel(cache)
    built = {}
    for tree in (a, b):  # b builds after a, before a's tests run
        result = subprocess.run(
            [tree / "scripts" / "build-guest.sh"],
            env=_env(cache),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        found = re.search(r"guest: initramfs (\S+)", result.stderr)
        assert found, result.stderr
        built[tree] = found.group(1)
    assert built[a] != built[b]
    (a / "tests" / "test_which.py").write_text(WHICH)
    env = _env(cache, PYTHONPATH=str(REPO))
    for setting in ("ISORUN_KERNEL", "ISORUN_INITRAMFS"):  # maybe set by our own conftest
        env.pop(setting, None)
    session = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests"],
        cwd=a,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stdout + session.stderr
    assert f"BOOTS {built[a]}" in session.stdout


def test_a_build_another_checkout_boots_is_kept_until_that_checkout_is_gone(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    builds = _builds(cache / "initramfs", 7)
    other_repo = tmp_path / "other-checkout"
    other_repo.mkdir()
    links = {"live": (other_repo, builds[1]), "gone": (tmp_path / "removed-checkout", builds[2])}
    for name, (repo, build) in links.items():
        own = cache / "guest" / "checkouts" / name
        own.mkdir(parents=True)
        (own / "initramfs.cpio").symlink_to(build / "initramfs.cpio")
        (own / "checkout").write_text(f"{repo}\n")
    in_use = builds[0] / "initramfs.cpio"
    result = subprocess.run([PRUNE, cache / "initramfs", in_use], capture_output=True)
    assert result.returncode == 0, result.stderr
    left = sorted(p.name for p in (cache / "initramfs").iterdir())
    # the one another checkout boots stays; the removed checkout's goes, with its links
    assert left == sorted(b.name for b in [builds[0], builds[1], *builds[-3:]])
    assert (cache / "guest" / "checkouts" / "live").is_dir()
    assert not (cache / "guest" / "checkouts" / "gone").exists()
