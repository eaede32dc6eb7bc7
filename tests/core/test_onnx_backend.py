"""ONNX lowering: opset, parity in ONNX Runtime, output naming, verification failures, safe writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from verification_models import export_cases

import fxopt
from fxopt.backends.onnx import export_onnx, lower, opset_of, run_onnx, verify_onnx
from fxopt.output.files import write_atomic


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Conv2d(8, 3, 1)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.body(x)
        return {"cls": self.cls(f), "box": self.box(f)}


def test_xavier_lowering_is_opset_17_and_matches_torch():
    torch.manual_seed(0)
    model, x = TwoHeads().eval(), (torch.randn(2, 3, 16, 16),)
    exported = lower(model, x, "xavier")
    assert exported.opset == opset_of(exported.model) == 17
    assert exported.output_names == ["cls", "box"]
    assert exported.max_abs_error is not None and exported.max_abs_error < 1e-4
    cls, box = run_onnx(exported, x)
    expected = model(*x)
    np.testing.assert_allclose(cls, expected["cls"].detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(box, expected["box"].detach().numpy(), atol=1e-4)


def test_cleanup_folds_constants_and_checker_passes():
    class ConstantBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.ones(4))

        def forward(self, x):
            return x + (self.a * 2 + 1)  # a constant subgraph folded into one initializer

    exported = export_onnx(ConstantBranch(), (torch.randn(1, 4),), opset=17)
    assert exported.op_types() == {"Add"}
    onnx.checker.check_model(exported.model, full_check=True)


def test_tampered_model_fails_verification():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(3, 4),)
    exported = export_onnx(model, x)
    init = exported.model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    with pytest.raises(fxopt.VerificationError, match="differs from torch"):
        verify_onnx(exported, model, x)


def test_export_failure_is_an_export_error():
    class Unexportable(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real  # no ONNX symbolic at opset 17 in the TorchScript exporter

    with pytest.raises(fxopt.ExportError, match="opset 17"):
        export_onnx(Unexportable(), (torch.randn(8),), opset=17)


def test_write_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    write_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class ZeroCanvasScatter(torch.nn.Module):
    """A static zero canvas written by index_put, as in a pillar scatter to a BEV image."""

    def forward(self, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(1000, 1000).index_put((i,), x) + torch.ones(1000, 1000)


def test_large_uniform_constants_become_constant_of_shape():
    x, i = torch.randn(5, 1000), torch.tensor([3, 1, 4, 0, 9])
    exported = export_onnx(ZeroCanvasScatter(), (x, i))
    assert len(exported.serialized()) < 64 * 1024  # two 4 MB constants before
    assert [n.op_type for n in exported.model.graph.node].count("ConstantOfShape") >= 1
    verify_onnx(exported, ZeroCanvasScatter(), (x, i))  # raises VerificationError on a mismatch


def test_non_uniform_constants_are_kept():
    table = torch.arange(200_000, dtype=torch.float32)

    class Lookup(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + table

    exported = export_onnx(Lookup(), (torch.randn(200_000),))
    assert "ConstantOfShape" not in {n.op_type for n in exported.model.graph.node}
    assert len(exported.serialized()) > 800_000


def test_zero_initialised_weight_becomes_constant_of_shape_and_matches():
    # torchvision's ViT initialises its classifier to zeros: a uniform initializer, not a Constant node
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    nn.init.zeros_(model[2].weight)
    x = torch.randn(2, 256)
    exported = lower(model, (x,), "xavier")  # raises ExportError / VerificationError on failure
    assert "ConstantOfShape" in {n.op_type for n in exported.model.graph.node}
    np.testing.assert_allclose(run_onnx(exported, (x,))[0], model(x).detach().numpy(), atol=1e-6)


def test_parity_is_a_value_the_check_returns_and_verify_records():
    from fxopt.backends.onnx import Parity, onnx_parity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = (torch.randn(3, 4),)
    exported = export_onnx(model, x, opset=17)
    found = onnx_parity(exported, model, x, check_inputs=[(torch.randn(3, 4),), (torch.randn(3, 4),)])
    assert exported.inputs_checked == 0 and exported.max_abs_error is None  # the check alone records nothing
    assert found.inputs_checked == 3 and 0 <= found.max_abs_error < 1e-4 and found.max_error_steps is None
    assert verify_onnx(exported, model, x).max_abs_error == onnx_parity(exported, model, x).max_abs_error
    a, b = Parity(0.1, 0.2, 1.0, None, None, 4), Parity(0.3, 0.1, None, 0.5, 2.0, 9)
    assert a.worst_with(b) == Parity(0.3, 0.2, 1.0, 0.5, 2.0, 4)  # per figure the worse; the first's input count


def test_the_fold_runs_only_where_it_changes_the_file(monkeypatch):
    # onnx-graphsurgeon's fold copies the whole graph: the clean-up skips it where it would fold nothing, and the
    # file is byte for byte the one the fold writes (pointpillars and mobilenet_v3_small have the exporter's
    # Identity nodes of weights, which the clean-up makes constants itself)
    import fxopt.backends.onnx as onnx_backend

    decided: dict[str, bool] = {}
    real = onnx_backend._has_foldable
    for name, model, inputs in export_cases():
        gm = fxopt.trace(model, inputs)
        monkeypatch.setattr(onnx_backend, "_has_foldable", lambda g, name=name: decided.setdefault(name, real(g)))
        ours = export_onnx(gm, inputs, tensorrt_version="8.5").model.SerializeToString()
        monkeypatch.setattr(onnx_backend, "_has_foldable", lambda g: True)
        folded = export_onnx(gm, inputs, tensorrt_version="8.5").model.SerializeToString()
        assert ours == folded, name
    assert not decided["mobilenet_v3_small"] and not decided["camera_multitask"]  # the skip was taken ...
    assert decided["safety_supervisor"]  # ... and the fold still runs where it has work


def test_an_identity_of_a_weight_becomes_its_own_initializer():
    # the exporter's Identity of a weight used twice: the clean-up makes its output a constant of its own (one
    # TensorProto held by two constants would be written twice under one name)
    import onnx.helper as helper
    import onnxruntime as ort
    from onnx import numpy_helper

    from fxopt.backends.onnx import _cleanup

    w = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["W_shared"]), helper.make_node("MatMul", ["x", "W"], ["y1"]),
         helper.make_node("MatMul", ["y1", "W_shared"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cleaned = _cleanup(model)
    assert sorted(i.name for i in cleaned.graph.initializer) == ["W", "W_shared"]
    assert [n.op_type for n in cleaned.graph.node] == ["MatMul", "MatMul"]
    onnx.checker.check_model(cleaned, full_check=True)
    x = np.random.default_rng(1).random((1, 4)).astype(np.float32)
    got = ort.InferenceSession(cleaned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w @ w, rtol=1e-5)


def test_a_large_model_reaches_onnx_runtime_through_a_file(monkeypatch):
    import fxopt.backends.onnx as onnx_backend

    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),)
    exported = export_onnx(fxopt.trace(model, x), x)
    small = onnx_backend.run_onnx(exported, x)
    monkeypatch.setattr(onnx_backend, "_LARGE_MODEL_BYTES", 0)  # every model counts as large
    through_file = onnx_backend.run_onnx(exported, x)
    np.testing.assert_array_equal(small[0], through_file[0])
    np.testing.assert_allclose(small[0], model(x[0]).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_large_model_is_checked_from_a_file_as_strictly(monkeypatch):
    import onnx.helper as helper

    import fxopt.backends.onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "_LARGE_MODEL_BYTES", 0)  # every model counts as large
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),)
    good = export_onnx(fxopt.trace(model, x), x).model  # the checker passed it from a file
    onnx_backend._check_model(good)
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["dangling"]))
    with pytest.raises(Exception, match="no_such_tensor"):
        onnx_backend._check_model(bad)
