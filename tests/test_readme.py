"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    from fxopt.passinfra import registry

    registry.pass_names()  # load the built-ins, then register the example's pass in a scratch copy
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    blocks = python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "out" / "readme" / "model.onnx").exists()


def test_readme_starts_with_the_two_setup_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
