"""The README's first commands work as written on a fresh Debian 12 machine, and CI runs
exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _first_block(text: str) -> tuple[str, list[str]]:
    """The prose before the README's first shell block, and that block's commands."""
    match = re.search(r"```sh\n(.*?)```", text, re.S)
    assert match, "README has no ```sh block"
    commands = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return text[: match.start()], [c for c in commands if c]


def test_the_first_commands_are_demo_and_test_and_ci_runs_the_test_one() -> None:
    _, commands = _first_block((REPO / "README.md").read_text())
    assert commands[:2] == ["make demo", "make test"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == commands[1]


def test_a_fresh_debian_gets_make_and_git_before_the_first_command() -> None:
    # neither is installed on a fresh Debian 12 (Priority: optional)
    before, _ = _first_block((REPO / "README.md").read_text())
    assert "apt-get install -y make git" in before
