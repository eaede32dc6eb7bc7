"""Regression tests for verification you can trust (issue 9): no silent miscompilation through
leaves, vacuous inputs or in-place writes; clean saves; strict inputs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from verification_models import Branchy, InPlaceInput, UnscriptableBranch, WithLeaf

import fxopt
from fxopt.output.output_folder import verify_output_folder
from fxopt.passes import FoldBatchNorm
from fxopt.passinfra.pass_base import FxoptPass, PassResult

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def ort_run(compiled, x):
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


class DoubleFirstConvWeights(FxoptPass):
    """Claims to be exact but doubles the first conv's weights: on an all-zero input the conv
    gives its bias either way, so a check on that input alone passes (the issue's probe)."""

    name = "double_first_conv"
    lossy = False

    def call(self, gm):
        next(m for m in gm.modules() if isinstance(m, nn.Conv2d)).weight.data.mul_(2)
        return PassResult(gm, True)


# --- 1. a leaf's data-dependent branch is never frozen silently ----------------------------------

def test_leaf_branch_becomes_an_onnx_if_and_matches_both_branches():
    torch.manual_seed(0)
    model = WithLeaf(Branchy()).eval()
    compiled = fxopt.compile(model, "xavier", example_inputs=(X,))
    assert [leaf.path for leaf in compiled.report.leaves] == ["middle"]
    assert "If" in {n.op_type for n in compiled.onnx_model.graph.node}
    assert compiled.report.onnx["lowered_by"] == "script"
    finding = next(n for n in compiled.report.notes if "ONNX If" in n)
    assert "leaf 'middle' (Branchy)" in finding and "verification_models.py" in finding and "if x.mean() > 0" in finding
    for x in (X, -3 * X):  # both branches
        np.testing.assert_allclose(ort_run(compiled, x), model(x).detach().numpy(), atol=1e-5)


def test_unscriptable_leaf_branch_is_refused_naming_leaf_and_line():
    model = WithLeaf(UnscriptableBranch()).eval()
    with pytest.raises(fxopt.ExportError, match=r"leaf 'middle' \(UnscriptableBranch\) at .*verification_models.py:\d+: `if x.mean\(\) > 0:`"):
        fxopt.compile(model, "cpu", example_inputs=(X,))


# --- 2. verification on one input can be vacuous --------------------------------------------------

@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.full((1, 3, 8, 8), float("nan")), r"example_inputs\[0\] holds 192 non-finite value\(s\) \(NaN"),
        (X.clone().index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))),
         r"example_inputs\[0\] holds 1 non-finite value\(s\) \(NaN, first at index \(0, 1, 2, 3\)"),
        (torch.full((1, 3, 8, 8), float("inf")), r"\(Inf"),
        (torch.randn(0, 3, 8, 8), r"example_inputs\[0\] is empty \(shape \(0, 3, 8, 8\)\)"),
    ],
    ids=["all-nan", "one-nan", "inf", "zero-batch"],
)
def test_vacuous_example_inputs_are_refused(x, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.compile(convnet(), "cpu", example_inputs=(x,))


def test_bad_calibration_batch_is_named_by_index():
    calib = [(X,), (torch.full_like(X, float("nan")),)]
    with pytest.raises(fxopt.InputError, match=r"calib_data\[1\]\[0\] holds 192 non-finite value\(s\) \(NaN"):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), calib_data=calib)
    with pytest.raises(fxopt.InputError, match="one-shot iterator"):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), calib_data=((X,) for _ in range(2)))


def test_constant_example_input_warns_and_variants_catch_a_wrong_exact_pass():
    zeros = torch.zeros(1, 3, 8, 8)
    with pytest.warns(fxopt.FxoptWarning, match="is constant"):
        compiled = fxopt.compile(convnet(), "cpu", example_inputs=(zeros,), passes=[DoubleFirstConvWeights()])
    record = next(r for r in compiled.report.passes if r.name == "double_first_conv")
    assert record.status == "rolled_back"
    assert "verification input set" in record.reason and "lossy=False" in record.reason
    assert any("is constant" in n for n in compiled.report.notes)
    assert any("WARNING: requested pass 'double_first_conv' was rolled back" in n for n in compiled.report.notes)


def test_every_check_reports_how_many_inputs_it_used():
    calib = [(torch.randn(1, 3, 8, 8),) for _ in range(2)] + [(torch.randn(2, 3, 8, 8),)]  # the last has another shape
    compiled = fxopt.compile(convnet(), "cpu", example_inputs=(X,), calib_data=calib)
    fold = next(r for r in compiled.report.passes if r.name == "fold_batchnorm")
    assert fold.status == "applied" and fold.inputs_checked == 1 + 3 + 2
    assert compiled.report.onnx["inputs_checked"] == 6
    assert compiled.manifest["verification_inputs"] == 6


# --- 3. in-place writes to a model input --------------------------------------------------------

def test_in_place_write_to_an_input_changes_nothing_of_the_callers():
    torch.manual_seed(0)
    model = InPlaceInput().eval()
    x = X.clone()
    compiled = fxopt.compile(model, "cpu", example_inputs=(x,))
    assert torch.equal(x, X), "fxopt ran the model on the caller's tensor"
    fold = next(r for r in compiled.report.passes if r.name == "fold_batchnorm")
    assert fold.status == "applied", fold.reason
    expected = model(X.clone())
    torch.testing.assert_close(compiled(X.clone()), expected, atol=1e-5, rtol=1e-4)


# --- 4. a user pass cannot take a built-in's name ---------------------------------------------------

def test_user_pass_cannot_shadow_a_builtin_even_before_any_lookup():
    code = (
        "import fxopt\n"
        "from fxopt.passinfra.pass_base import FxoptPass, PassResult\n"
        "try:\n"
        "    @fxopt.register_pass\n"
        "    class FoldBatchNorm(FxoptPass):\n"
        "        name = 'fold_batchnorm'\n"
        "        def call(self, gm):\n"
        "            return PassResult(gm, False)\n"
        "except fxopt.PassRegistryError as exc:\n"
        "    print('refused:', exc)\n"
        "print('prune' in fxopt.pass_names(), fxopt.passinfra.registry.pass_class('fold_batchnorm').__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "refused: pass name 'fold_batchnorm' of __main__.FoldBatchNorm is already taken by fxopt.passes.fold_batchnorm.FoldBatchNorm" in out
    assert "True fxopt.passes.fold_batchnorm" in out


# --- 5. a folder always holds one consistent compile ------------------------------------------------

def test_saving_over_another_compile_leaves_no_mixed_set(tmp_path):
    folder = tmp_path / "out"
    fxopt.compile(convnet(), "xavier", example_inputs=(X,)).save(folder)
    assert (folder / "build_engine.sh").exists() and (folder / "placement.md").exists()
    fxopt.compile(convnet(), "cpu", example_inputs=(X,)).save(folder)
    assert sorted(os.listdir(folder)) == ["manifest.json", "model.onnx", "report.json", "report.md"]
    assert verify_output_folder(folder) == []
    assert json.loads((folder / "manifest.json").read_text())["target"]["name"] == "cpu"


def test_interrupted_overwrite_keeps_the_old_consistent_set(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    fxopt.compile(convnet(), "xavier", example_inputs=(X,)).save(folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    compiled = fxopt.compile(convnet(), "cpu", example_inputs=(X,))
    import fxopt.output.output_folder as of
    from fxopt.output.files import write_atomic as real_write

    calls = []

    def failing_write(path, data, **kw):  # the second file of the new set fails
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_write(path, data, **kw)

    monkeypatch.setattr(of, "write_atomic", failing_write)
    with pytest.raises(KeyboardInterrupt):
        compiled.save(folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert verify_output_folder(folder) == []
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.fxopt")], "staging folder left behind"


def test_verify_finds_edited_missing_and_stray_files(tmp_path):
    folder = tmp_path / "out"
    fxopt.compile(convnet(), "xavier", example_inputs=(X,)).save(folder)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:-10])
    (folder / "placement.md").unlink()
    (folder / "notes.txt").write_text("mine")
    problems = verify_output_folder(folder)
    assert any(p.startswith("model.onnx: SHA-256 differs") for p in problems)
    assert "placement.md: listed in the manifest but missing" in problems
    assert "notes.txt: not listed in the manifest (left from another compile?)" in problems


def test_saved_files_have_normal_permissions_and_distinct_trtexec_outputs(tmp_path):
    folder = tmp_path / "out"
    fxopt.compile(convnet(), "xavier", example_inputs=(X,)).save(folder)
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(folder):
        mode = stat.S_IMODE((folder / name).stat().st_mode)
        assert mode == ((0o777 if name == "build_engine.sh" else 0o666) & ~mask), (name, oct(mode))
    lines = [line for line in (folder / "build_engine.sh").read_text().splitlines() if line.startswith("trtexec")]
    assert len(lines) == 2
    outputs = [{arg for arg in line.split() if arg.startswith(("--saveEngine", "--exportProfile", "--exportLayerInfo"))} for line in lines]
    assert not {a.split("=")[1] for a in outputs[0]} & {a.split("=")[1] for a in outputs[1]}


def test_save_refuses_a_folder_with_foreign_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(fxopt.InputError, match=r"holds files no fxopt compile wrote \(thesis.tex\)"):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,)).save(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


# --- 6. quiet acceptance of mistakes -----------------------------------------------------------------

def test_misspelt_option_is_refused_listing_the_known_ones():
    with pytest.raises(fxopt.InputError, match=r"unknown compile option\(s\) 'calib_dta'; known here: calib_data"):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), calib_dta=[(X,)])
    # prune declares what it reads
    fxopt.compile(convnet(), "cpu", example_inputs=(X,), passes=["prune"], calib_labels=torch.zeros(1), export=False)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (None, r"passes\[0\] is None \(NoneType\), not a pass"),
        (123, r"passes\[0\] is 123 \(int\), not a pass"),
        (nn.ReLU(), r"passes\[0\] is a torch module \(ReLU\), not a pass"),
        (FoldBatchNorm, r"passes\[0\] is the pass class FoldBatchNorm, not an instance: write FoldBatchNorm\(...\)"),
    ],
)
def test_non_pass_entries_are_refused_before_work(entry, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), passes=[entry])


def test_requested_pass_that_changes_nothing_says_why_loudly():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    compiled = fxopt.compile(model, "cpu", example_inputs=(torch.randn(2, 4),), passes=["fold_batchnorm"])
    record = next(r for r in compiled.report.passes if r.name == "fold_batchnorm")
    assert record.status == "unchanged" and record.reason
    assert any(n.startswith("WARNING: requested pass 'fold_batchnorm' changed nothing:") for n in compiled.report.notes)


def test_int8_without_calibration_data_is_refused_before_work():
    # precision="int8" adds the quantize pass; without calib_data there would be no calibration
    with pytest.raises(fxopt.InputError, match=r"int8 for 'xavier' needs calib_data="):
        fxopt.compile(convnet(), "xavier", example_inputs=(X,), precision="int8")


def test_save_under_a_file_is_refused_before_the_compile(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(fxopt.InputError, match="is a file, not a directory"):
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), save_to=tmp_path / "file" / "out")


# --- 8. progress for every phase ----------------------------------------------------------------------

def test_progress_names_the_phases(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.compile(convnet(), "cpu", example_inputs=(X,), progress=True)
    err = capsys.readouterr().err
    for phase in ("trace", "passes", "export"):
        assert phase in err
