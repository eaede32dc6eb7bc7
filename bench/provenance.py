"""Where a benchmark's figures come from: the git commit, and whether the code had uncommitted changes."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("fxopt", "passes", "backends", "models", "safety")


def code_version() -> str:
    """The code a benchmark ran: its version when this module was imported (the start of the run),
    and the version at the call too when the tree changed meanwhile (a long run writes its file
    after other commits landed)."""
    now = _version_now()
    return _AT_START if now == _AT_START else f"{_AT_START} (at the end of the run: {now})"


def _version_now() -> str:
    """``commit abc1234``, plus the changed files when the library code had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", *CODE_DIRS],
                               capture_output=True, text=True, check=True).stdout.rstrip()  # " M path": keep the status column
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    changed = sorted({line[3:].split(" -> ")[-1] for line in dirty.splitlines() if not _own_link(line)})
    more = " ..." if len(changed) > 4 else ""
    return f"commit {head}" + (f" (uncommitted changes in the tree: {', '.join(changed[:4])}{more})" if changed else "")


def _own_link(status_line: str) -> bool:
    # an untracked link to one of the tree's own folders (a worktree made importable as fxopt/backends ->
    # ../backends) adds no code
    path = ROOT / status_line[3:].rstrip("/")
    return status_line.startswith("?? ") and path.is_symlink() and path.resolve().is_relative_to(ROOT.resolve())


_AT_START = _version_now()


def cpu_model() -> str:
    """The CPU a figure was measured on, as `lscpu` names it (a figure names its CPU)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"
