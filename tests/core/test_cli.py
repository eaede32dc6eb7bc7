"""The fxopt command line, run end to end in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fxopt.cli import parse_shape
from fxopt.errors import InputError


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fxopt", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def factory_dir(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def small_net():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

        def broken():
            raise RuntimeError("weights file not found")

        def gated():
            class Gate(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(3, 8, 3, padding=1)
                    self.bn = nn.BatchNorm2d(8)
                    self.mid = nn.Conv2d(8, 8, 3, padding=1)
                    self.head = nn.Conv2d(8, 2, 1)

                def forward(self, x):
                    return self.head(self.mid(self.bn(self.conv(x)).relu()))
            return Gate()

        def two_inputs():
            class M(nn.Module):
                def forward(self, a, b):
                    return a * 2 + b
            return M()
    """))
    return tmp_path


def test_compile_end_to_end(factory_dir):
    proc = run_cli("compile", "my_models:two_inputs", "--target", "xavier", "--input-shape", "1x4", "--input-shape", "1x4", "-o", "out", "-q", cwd=factory_dir)
    assert proc.returncode == 0, proc.stderr
    assert "fxopt: M for xavier" in proc.stdout
    manifest = json.loads((factory_dir / "out" / "manifest.json").read_text())
    assert manifest["example_inputs"] == [[1, 4], [1, 4]]
    assert (factory_dir / "out" / "model.onnx").stat().st_size > 0


def test_user_errors_have_no_traceback(factory_dir):
    proc = run_cli("compile", "my_models:missing", "--input-shape", "1x3x8x8", cwd=factory_dir)
    assert proc.returncode == 2
    assert "fxopt: error: module 'my_models' has no attribute 'missing'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("compile", "my_models:two_inputs", "--target", "tx2", "--input-shape", "1x4", "--input-shape", "1x4", cwd=factory_dir)
    assert proc.returncode == 2 and "known targets" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--debug", "compile", "my_models:missing", "--input-shape", "1x3x8x8", cwd=factory_dir)
    assert "Traceback" in proc.stderr


def test_targets_and_passes_listings(tmp_path):
    targets = run_cli("targets", cwd=tmp_path)
    assert targets.returncode == 0 and "xavier" in targets.stdout and "TensorRT 8.5" in targets.stdout
    passes = run_cli("passes", cwd=tmp_path)
    assert passes.returncode == 0 and "fold_batchnorm" in passes.stdout


def test_parse_shape():
    assert parse_shape("1x3x224x224")[0] == (1, 3, 224, 224)
    assert str(parse_shape("2x5:int64")[1]) == "torch.int64"
    for bad in ("1xax3", "0x3", "1x3:complex"):
        with pytest.raises(InputError):
            parse_shape(bad)


def test_models_lists_the_bundled_models(tmp_path):
    proc = run_cli("models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"pointpillars", "camera_multitask", "motionnet", "safety_supervisor"} <= set(names)
    assert "kitti" in next(line for line in proc.stdout.splitlines() if line.startswith("pointpillars"))


def test_compile_a_bundled_model_by_name(tmp_path):
    proc = run_cli("compile", "safety_supervisor", "--target", "xavier", "-o", "out", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "xavier" and (tmp_path / "out" / "model.onnx").stat().st_size > 0
    assert manifest["precision"] == "fp32"  # the supervisor's deployment precision, not xavier's fp16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("compile", "no_such_model"), "unknown model 'no_such_model'"),
        (("compile", "my_models:small_net", "--preset", "kitti", "--input-shape", "1x3x8x8"), "--preset applies to bundled models"),
    ],
)
def test_bundled_model_errors_are_one_line(factory_dir, args, message):
    proc = run_cli(*args, "-q", cwd=factory_dir)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_factory_that_raises_is_a_one_line_error(factory_dir):
    proc = run_cli("compile", "my_models:broken", "--input-shape", "1x3x8x8", cwd=factory_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fxopt: error: the factory 'my_models:broken' raised RuntimeError: weights file not found" in proc.stderr


def test_pass_options_calib_data_leaf_and_verify(factory_dir):
    torch.save([(torch.randn(1, 3, 16, 16),) for _ in range(3)], factory_dir / "calib.pt")
    proc = run_cli(
        "compile", "my_models:gated", "--target", "cpu", "--input-shape", "1x3x16x16",
        "--pass", "prune:amount=0.5,by=flops,importance=taylor,round_to=1", "--calib-data", "calib.pt", "--leaf", "head",
        "-o", "out", "-q", cwd=factory_dir,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((factory_dir / "out" / "report.json").read_text())
    prune = next(p for p in report["passes"] if p["name"] == "prune")
    assert prune["status"] == "applied" and prune["options"]["importance"] == "taylor" and prune["options"]["amount"] == 0.5
    assert prune["inputs_checked"] == 1 + 3 + 3
    assert [leaf["path"] for leaf in report["leaves"]] == ["head"]
    ok = run_cli("verify", "out", cwd=factory_dir)
    assert ok.returncode == 0 and "every file matches manifest.json" in ok.stdout
    (factory_dir / "out" / "report.md").write_text("edited")
    bad = run_cli("verify", "out", cwd=factory_dir)
    assert bad.returncode == 2 and "report.md: SHA-256 differs from the manifest" in bad.stderr


def test_calib_data_npz(factory_dir):
    import numpy as np

    np.savez(factory_dir / "calib.npz", input_0=np.random.default_rng(0).standard_normal((2, 1, 3, 16, 16)).astype("float32"))
    proc = run_cli("compile", "my_models:gated", "--target", "cpu", "--input-shape", "1x3x16x16", "--calib-data", "calib.npz", "-o", "out", "-q", cwd=factory_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((factory_dir / "out" / "manifest.json").read_text())["verification_inputs"] == 1 + 3 + 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--pass", "prune:amout=0.5"), "pass 'prune' has no option 'amout'; its options: allocation, amount,"),
        (("--pass", "prune:0.5"), "bad --pass 'prune:0.5': expected NAME:key=value"),
        (("--pass", "prnue"), "unknown pass 'prnue'"),
        (("--calib-data", "missing.pt"), "--calib-data 'missing.pt' is not a file"),
        (("-o", "my_models.py/out"), "is a file, not a directory"),
    ],
)
def test_cli_input_errors_come_before_work(factory_dir, args, message):
    proc = run_cli("compile", "my_models:gated", "--input-shape", "1x3x16x16", *args, "-q", cwd=factory_dir)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert "compiling" not in proc.stderr


def test_version_and_help_examples(tmp_path):
    import fxopt

    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fxopt {fxopt.__version__}"
    helptext = run_cli("compile", "--help", cwd=tmp_path).stdout
    for example in ("--pass prune:amount=0.5,by=flops", "--calib-data calib.pt", "--leaf backbone.custom_block", "fxopt verify"):
        assert example in helptext


def test_safety_supervisor_refuses_fp16_and_records_its_evidence(tmp_path):
    proc = run_cli("compile", "safety_supervisor", "--precision", "fp16", "-o", "out", "-q", cwd=tmp_path)
    assert proc.returncode == 2 and "safety_supervisor must be deployed at fp32; fp16 was requested" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("compile", "safety_supervisor", "--pass", "prune", "-o", "out", "-q", cwd=tmp_path)
    assert proc.returncode == 2 and "refuses lossy pass 'prune'" in proc.stderr


def test_slim_command_with_a_shared_journal_study(tmp_path):
    (tmp_path / "wide.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def net():  # compute-bound on the CPU, so a narrower candidate is measurably faster
            torch.manual_seed(0)  # workers sharing a study search the same weights
            return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 2, 1))
    """))
    torch.save([(torch.randn(2, 3, 48, 48),) for _ in range(3)], tmp_path / "calib.pt")
    journal = tmp_path / "study.journal"
    factory_dir = tmp_path
    common = ["slim", "wide:net", "--input-shape", "1x3x48x48", "--calib-data", "calib.pt", "--target", "cpu",
              "--latency-ratio", "0.8", "--trials", "3", "--space", "width", "--storage", str(journal), "--study", "wide", "-q"]
    first = run_cli(*common, "--search-seed", "1", "-o", "out1", cwd=factory_dir)
    assert first.returncode == 0, first.stderr
    second = run_cli(*common, "--search-seed", "2", "-o", "out2", cwd=factory_dir)
    assert second.returncode == 0, second.stderr
    rows = (factory_dir / "out2" / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + both workers' trials: the second run continued the first's study
    assert (factory_dir / "out2" / "pareto.png").exists() and not (factory_dir / "out2" / "study.db").exists()
    assert "slim: chosen architecture" in (factory_dir / "out2" / "report.md").read_text()


def test_slim_command_needs_data_and_a_budget(factory_dir):
    no_data = run_cli("slim", "my_models:gated", "--input-shape", "1x3x16x16", "--latency-ratio", "0.5", cwd=factory_dir)
    assert no_data.returncode == 2 and "--calib-data" in no_data.stderr and "Traceback" not in no_data.stderr
    no_budget = run_cli("slim", "my_models:gated", "--input-shape", "1x3x16x16", cwd=factory_dir)
    assert no_budget.returncode == 2 and "--latency-ratio" in no_budget.stderr


def test_slim_calibrates_a_preset_on_that_preset_s_recipe():
    from fxopt.cli import _recipe_calibration

    batches = _recipe_calibration("camera_multitask", 2, "md")
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 192, 320)  # not the default 96x160 scenes
    assert _recipe_calibration("camera_multitask", 1)[0][0].shape == (8, 3, 96, 160)
    with pytest.raises(InputError, match="'motionnet' with --preset full brings no data: give --calib-data"):
        _recipe_calibration("motionnet", 1, "full")  # its recipe trains the default config only
