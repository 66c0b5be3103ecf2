"""The README's `make demo` / `make test` under parallel make (make -j, or MAKEFLAGS=-j in a
CI environment): the guest build, venv and test suites need what `deps` installs, so they
must not start before it is done. The Makefile runs against stub scripts and tools that
log when they run and fail if what they need has not run yet."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def _step(name: str, needs: str = "") -> str:
    """A stub that fails when a step it needs is not logged yet, then logs its own name."""
    check = "".join(
        f'grep -qx {need} "$LOG" || {{ echo "{name} before {need}" >&2; exit 1; }}\n'
        for need in needs.split()
    )
    return f'#!/bin/sh\n{check}sleep 0.3\necho {name} >> "$LOG"\n'


def _stub(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _tree(tmp: Path) -> Path:
    tree = tmp / "repo"
    (tree / "guest" / "agent").mkdir(parents=True)
    shutil.copy(MAKEFILE, tree / "Makefile")
    (tree / "pyproject.toml").write_text("")
    (tree / ".venv").mkdir()
    (tree / ".venv" / ".installed").touch()  # newer than pyproject.toml: venv is up to date
    _stub(tree / "scripts" / "install-deps.sh", '#!/bin/sh\nsleep 1\necho deps >> "$LOG"\n')
    _stub(tree / "scripts" / "build-guest.sh", _step("guest", "deps"))
    _stub(tree / "scripts" / "find-go.sh", f"#!/bin/sh\necho {tmp}/go/go\n")
    _stub(tmp / "go" / "go", _step("go", "deps"))
    _stub(tmp / "go" / "gofmt", "#!/bin/sh\n")
    _stub(tree / ".venv" / "bin" / "python", _step("demo", "deps guest"))
    _stub(tree / ".venv" / "bin" / "pytest", _step("pytest", "deps guest"))
    for tool in ("ruff", "mypy"):
        _stub(tree / ".venv" / "bin" / tool, "#!/bin/sh\n")
    return tree


@pytest.mark.parametrize("target", ["demo", "test"])
def test_parallel_make_runs_deps_before_what_needs_them(tmp_path: Path, target: str) -> None:
    tree = _tree(tmp_path)
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "LOG": str(log), "MAKEFLAGS": "-j4"}
    result = subprocess.run(
        ["make", target], cwd=tree, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert log.read_text().split()[0] == "deps"
