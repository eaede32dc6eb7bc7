"""fxopt.compile end to end: pipelines, the compiled model, save(), manifest and errors."""

from __future__ import annotations

import hashlib
import json

import onnx
import pytest
import torch
from torch import nn

import fxopt
from fxopt.compiler import state_dict_sha256


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


X = (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("target", ["xavier", "cpu", "orin"])
def test_default_pipeline_canonicalises_folds_and_matches(target):
    model = convnet()
    compiled = fxopt.compile(model, target, example_inputs=X)
    records = {r.name: r for r in compiled.report.passes}
    assert list(records) == ["canonicalize", "fold_batchnorm"]
    assert records["canonicalize"].status == "applied"  # the dropout went
    assert records["fold_batchnorm"].status == "applied"
    ops = [type(m).__name__ for m in compiled.graph_module.modules()]
    assert "BatchNorm2d" not in ops and "Dropout" not in ops
    torch.testing.assert_close(compiled(*X), model.eval()(*X), atol=1e-5, rtol=1e-4)
    assert compiled.report.onnx["opset"] == 17
    assert compiled.report.onnx["max_abs_error_vs_torch"] < 1e-4
    assert compiled.report.cost_after.params < compiled.report.cost_before.params


def test_save_writes_the_four_files_and_manifest(tmp_path):
    model = convnet()
    compiled = fxopt.compile(model, "xavier", example_inputs=X)
    paths = compiled.save(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["build_engine.py", "build_engine.sh", "manifest.json", "model.onnx", "placement.md", "report.json", "report.md"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    data = (tmp_path / "out" / "model.onnx").read_bytes()
    assert manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["input_state_dict_sha256"] == state_dict_sha256(model)
    assert manifest["target"]["name"] == "xavier" and manifest["versions"]["torch"] == torch.__version__
    assert [p["name"] for p in manifest["passes"]] == ["canonicalize", "fold_batchnorm"]
    assert onnx.load(paths["onnx"]).graph.node
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["target"] == "xavier" and len(report["passes"]) == 2
    assert "| fold_batchnorm | applied |" in (tmp_path / "out" / "report.md").read_text()


def test_save_refuses_a_file_path(tmp_path):
    compiled = fxopt.compile(convnet(), "cpu", example_inputs=X, export=False)
    blocker = tmp_path / "taken"
    blocker.write_text("user data")
    with pytest.raises(fxopt.InputError, match="not a directory"):
        compiled.save(blocker)
    assert blocker.read_text() == "user data"


def test_listed_passes_run_after_canonicalisation():
    class Count(fxopt.FxoptPass):
        name = "count_for_test"

        def call(self, gm):
            self.nodes = len(gm.graph.nodes)
            return fxopt.PassResult(gm, False)

    counter = Count()
    compiled = fxopt.compile(convnet(), "cpu", example_inputs=X, passes=[counter, "eliminate_dead_code"], export=False)
    assert [r.name for r in compiled.report.passes] == ["canonicalize", "fold_batchnorm", "count_for_test", "eliminate_dead_code"]
    assert counter.nodes == 9  # dropout gone and both BatchNorms folded before it ran


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target": "tx2"}, fxopt.TargetError, "known targets"),
        ({"precision": "int4"}, fxopt.InputError, "no precision 'int4'"),
        ({"passes": ["nope"]}, fxopt.PassRegistryError, "unknown pass 'nope'"),
        ({"passes": "canonicalize"}, fxopt.InputError, "list of pass names"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fxopt.compile(convnet(), example_inputs=X, **{"target": "cpu", **kwargs})


def test_report_text_and_dict():
    compiled = fxopt.compile(convnet(), "xavier", example_inputs=X)
    text = str(compiled.report)
    assert "fold_batchnorm" in text and "opset 17" in text and "xavier" in text
    data = compiled.report.to_dict()
    assert data["cost_after"]["flops"] > 0 and data["layers"]
    assert json.loads(compiled.report.to_json())["precision"] == "fp16"


def test_pass_tables_reach_the_report_and_rollback_drops_them():
    class Tabled(fxopt.FxoptPass):
        name = "tabled_for_test"
        lossy = True

        def __init__(self, fail):
            super().__init__()
            self.fail = fail

        def call(self, gm):
            gm.meta.setdefault("fxopt_tables", {})[f"groups ({self.fail})"] = [{"group": 0, "before": 8, "after": 4}]
            if self.fail:
                raise ValueError("after writing a table")
            return fxopt.PassResult(gm, False)

    compiled = fxopt.compile(convnet(), "cpu", example_inputs=X, passes=[Tabled(True), Tabled(False)], export=False)
    assert list(compiled.report.tables) == ["groups (False)"]
    markdown = compiled.report.to_markdown()
    assert "## groups (False)" in markdown and "| 0 | 8 | 4 |" in markdown


def test_fxopt_warnings_point_at_the_users_call_not_at_fxopt():
    import warnings

    model = nn.Sequential(nn.Linear(4, 2)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxopt.compile(model, "cpu", example_inputs=(torch.ones(1, 4),), export=False)  # a constant input: warned
    ours = [w for w in caught if issubclass(w.category, fxopt.FxoptWarning)]
    assert ours and all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)) for w in ours]


def test_a_model_built_in_inference_mode_compiles_and_is_left_alone():
    # its tensors have no version counter: the end-of-compile check marks them by their bytes
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = fxopt.compile(model, "cpu", example_inputs=(torch.randn(2, 4),))
    assert compiled.report.onnx["opset"] == 17
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
