"""Walking and removing directory trees an image made, without recursion.

A layer can hold a directory tree thousands of levels deep: os.walk and shutil.rmtree
recurse once per level on Python 3.11 and raise RecursionError (not OSError) on it, which
would leak the tree and break every later gc() or disk_usage()."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path


def walk_lstat(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of everything under `root`, depth first, never following symlinks.
    Entries that vanish or cannot be read are skipped: callers only estimate sizes."""
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
            yield e.path, st


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it, ignoring errors (like rmtree(ignore_errors)),
    however deep it is: past Python's recursion limit, `rm -rf` (which does not recurse on
    the stack) does it."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["rm", "-rf", "--", str(path)], check=False, capture_output=True)
