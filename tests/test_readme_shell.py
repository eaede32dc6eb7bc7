"""README's command-line blocks run as written, in order, in an empty folder.

A ```sh block of the "Command line" section is preceded by an HTML comment saying how it is
run: ``<!-- readme-shell: quick -->`` (here, in the default suite), ``<!-- readme-shell: slow -->``
(`make slow`) or ``<!-- readme-shell: not run (why) -->``. Each block runs with ``bash -e``, so the
first failing line fails the test, and every folder the blocks wrote must pass ``fxopt verify``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxopt.output.output_folder import verify_output_folder

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_OUTPUTS = {"resnet18", "pointpillars", "net_pruned", "net_taylor", "net_leaf", "net_slim", "net_slim_1"}
MARKED_BLOCK = re.compile(r"<!-- readme-shell: (quick|slow|not run \([^)]+\)) -->\n```sh\n(.*?)```", re.S)


def command_line_section() -> str:
    text = README.read_text()
    start = text.index("\n## Command line\n")
    return text[start:text.index("\n## ", start + 1)]


def shell_blocks(kind: str) -> list[str]:
    return [body for mark, body in MARKED_BLOCK.findall(command_line_section()) if mark == kind]


def run_blocks(blocks: list[str], folder: Path) -> None:
    # the venv's fxopt and python come first on PATH, as after `make demo` and activating it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert (Path(sys.executable).parent / "fxopt").exists(), "the fxopt command is not installed in this environment"
    for block in blocks:
        proc = subprocess.run(["bash", "-e", "-x", "-c", block], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README block failed (exit {proc.returncode}):\n{block}\n--- stderr ---\n{proc.stderr[-4000:]}"


def verified_folders(out: Path) -> set[str]:
    """The names of the output folders under `out`, each checked to pass `fxopt verify`."""
    folders = sorted(p.parent for p in out.glob("*/manifest.json"))
    for folder in folders:
        assert verify_output_folder(folder) == [], folder
    return {folder.name for folder in folders}


def test_every_command_line_block_says_how_it_is_run():
    section = command_line_section()
    assert section.count("```sh") == len(MARKED_BLOCK.findall(section)) >= 4
    assert shell_blocks("quick") and shell_blocks("slow")


def test_quick_blocks_run_in_order(tmp_path):
    run_blocks(shell_blocks("quick"), tmp_path)
    assert verified_folders(tmp_path / "out") == QUICK_OUTPUTS


@pytest.mark.slow
def test_slow_blocks_run_after_the_quick_ones(tmp_path):
    run_blocks(shell_blocks("quick") + shell_blocks("slow"), tmp_path)
    assert verified_folders(tmp_path / "out") == QUICK_OUTPUTS | {"pointpillars_kitti", "cam_slim"}
