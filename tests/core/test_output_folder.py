"""A saved folder covers every file in it, manifest.json included (`fxopt verify`), and a refused
save says what is in the way (issue 23)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.cli import main
from fxopt.output.output_folder import (
    MANIFEST_DIGEST,
    manifest_digest,
    verify_output_folder,
    write_output_folder,
)


@pytest.fixture(scope="module")
def saved_supervisor(tmp_path_factory):
    # the safety supervisor's strict compile: its manifest holds the safety evidence
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved") / "supervisor"
    model = models.create("safety_supervisor")
    fxopt.compile(model, "xavier", example_inputs=models.example_inputs("safety_supervisor"), save_to=folder)
    return folder


@pytest.fixture()
def folder(saved_supervisor, tmp_path):
    copy = tmp_path / "supervisor"
    shutil.copytree(saved_supervisor, copy)
    return copy


def verify(folder, capsys):
    code = main(["verify", str(folder)])
    out, err = capsys.readouterr()
    return code, out, err


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def test_untouched_folder_verifies(folder, capsys):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest[MANIFEST_DIGEST] == manifest_digest(manifest)
    assert manifest["target"]["name"] == "xavier" and manifest["safety"]["policy"] == "strict"
    code, out, err = verify(folder, capsys)
    assert code == 0 and err == ""
    assert "every file matches manifest.json, and manifest.json its own SHA-256" in out


def set_target_orin(manifest):
    manifest["target"]["name"] = "orin"


def forge_determinism(manifest):
    manifest["safety"]["determinism"]["runs"] += 1


def weaken_policy(manifest):
    manifest["safety"]["policy"] = "off"


def drop_a_property_check(manifest):
    del manifest["safety"]["properties"]["onnx"]


@pytest.mark.parametrize("change", [set_target_orin, forge_determinism, weaken_policy, drop_a_property_check])
def test_an_edited_manifest_fails_verify(folder, capsys, change):
    edit_manifest(folder, change)
    code, out, err = verify(folder, capsys)
    assert code == 2 and "every file matches" not in out
    assert f"{folder}: manifest.json: edited after it was written: its content no longer matches its own SHA-256" in err
    assert "does not verify (1 problem(s) above)" in err


def test_a_text_edit_of_the_manifest_fails_verify(folder, capsys):
    path = folder / "manifest.json"
    text = path.read_text()
    assert text.count('"name": "xavier"') == 1
    path.write_text(text.replace('"name": "xavier"', '"name": "orin"'))
    code, _, err = verify(folder, capsys)
    assert code == 2 and "manifest.json: edited after it was written" in err


def test_a_duplicated_key_is_refused(folder, capsys):
    # json keeps the last "precision", so appending one changes what a reader sees
    path = folder / "manifest.json"
    text = path.read_text().rstrip()
    assert text.endswith("}")
    path.write_text(text[:-1].rstrip() + ',\n  "precision": "int8"\n}\n')
    code, _, err = verify(folder, capsys)
    assert code == 2 and "manifest.json: missing or unreadable (ValueError: key 'precision' appears more than once)" in err


def test_reformatting_keeps_the_digest(folder, capsys):
    path = folder / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4, sort_keys=True))
    code, _, err = verify(folder, capsys)
    assert code == 0, err


def test_a_manifest_without_self_digest_is_reported_as_such(folder, capsys):
    # a folder from before manifests covered themselves: the files are checked, the gap is said
    edit_manifest(folder, lambda manifest: manifest.pop(MANIFEST_DIGEST))
    code, _, err = verify(folder, capsys)
    assert code == 2
    assert f"manifest.json: has no {MANIFEST_DIGEST}, so an edit of manifest.json itself" in err
    assert f"written by fxopt {fxopt.__version__} before manifests covered themselves, or the field was removed" in err
    assert "does not verify (1 problem(s) above)" in err
    (folder / "report.md").write_text("edited")
    problems = verify_output_folder(folder)
    assert len(problems) == 2 and problems[1].startswith("report.md: SHA-256 differs from the manifest")


def test_an_edited_model_is_still_found(folder, capsys):
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    code, _, err = verify(folder, capsys)
    assert code == 2 and "model.onnx: SHA-256 differs from the manifest" in err and "manifest.json:" not in err


def test_digest_covers_what_the_file_holds_for_values_json_lacks(tmp_path):
    # tuples, dtypes and int keys are written as JSON turns them (default=str); the digest is of that
    manifest = {"dtype": torch.float32, "shape": (1, 3), "by_index": {0: "first"}}
    write_output_folder(tmp_path / "out", {"report.md": "# r"}, manifest)
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["dtype"] == "torch.float32" and written["by_index"] == {"0": "first"}
    assert verify_output_folder(tmp_path / "out") == []


def test_default_output_refusal_says_what_is_wrong(tmp_path, monkeypatch, capsys):
    # README's old order: a compile into out/pp, then one without -o (./out) holding it
    write_output_folder(tmp_path / "out" / "pp", {"report.md": "# pp"}, {})
    monkeypatch.chdir(tmp_path)
    code = main(["compile", "pointpillars", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "compiling" not in err
    assert "cannot save into 'out': it holds output folders of other compiles (pp/); saving replaces the whole folder" in err
    assert "No -o/--output was given, so the default ./out was used: give each compile its own folder with -o DIR" in err
    assert (tmp_path / "out" / "pp" / "report.md").read_text() == "# pp"
    code = main(["compile", "pointpillars", "-q", "-o", "out"])
    err = capsys.readouterr().err
    assert code == 2 and "output folders of other compiles (pp/)" in err and "No -o/--output" not in err


def test_help_documents_the_default_output():
    import argparse

    from fxopt.cli import build_parser

    compile_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["compile"]
    assert "(default: ./out)" in " ".join(compile_parser.format_help().split())
