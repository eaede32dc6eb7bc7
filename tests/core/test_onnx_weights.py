"""Lean ONNX models (fxopt.output.onnx_weights): the weights stay in torch until the file is written."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from verification_models import export_cases

import fxopt
import fxopt.backends.onnx as onnx_backend
from fxopt.backends.onnx import export_onnx, run_onnx
from fxopt.errors import ExportError
from fxopt.output import onnx_weights
from fxopt.output.onnx_weights import (
    WeightsChangedError,
    WeightStore,
    full_model,
    is_lean,
    serialize,
    tensor_values,
)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in full_model(model).graph.initializer}


def _same_file(lean: onnx.ModelProto, usual: onnx.ModelProto) -> None:
    """The lean model, written out, is the usual export byte for byte (and so the same nodes and initializers)."""
    assert is_lean(lean) and not is_lean(usual)
    data = serialize(lean)
    assert data == usual.SerializeToString()
    written = onnx.load_from_string(data)
    assert not is_lean(written)
    assert [(n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in usual.graph.node]
    got, want = _initializers(written), _initializers(usual)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name
    onnx.checker.check_model(written, full_check=True)


def test_a_store_reads_its_tensors_in_place_and_refuses_one_written_since():
    weight = torch.randn(64, 32)
    store = WeightStore()
    proto = store.add("w", weight)
    values = tensor_values(proto)
    assert np.shares_memory(values, weight.numpy()) and not values.flags.writeable
    twin = onnx_weights.alias(proto, "w_again")
    assert twin.name == "w_again" and np.shares_memory(tensor_values(twin), values)
    assert copy.deepcopy(store) is store
    assert numpy_helper.to_array(onnx_weights.full_tensor(proto)).tobytes() == weight.numpy().tobytes()
    weight.mul_(2)  # the graph module's weight trained after export: its file would differ from what was verified
    with pytest.raises(WeightsChangedError, match="'w' was changed in place after the model was exported"):
        tensor_values(proto)


def test_a_model_whose_store_is_gone_says_so():
    proto = WeightStore().add("w", torch.randn(300))  # the store is dropped at once: nothing holds it
    with pytest.raises(ExportError, match="refers to weights .* that are no longer held"):
        tensor_values(proto)


def test_the_written_file_is_one_model_to_every_reader():
    # the weightless part, then one message per weight: protobuf merges them into one graph
    weight = torch.randn(40, 40)
    store = WeightStore()
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y0"]), onnx.helper.make_node("Add", ["y0", "b"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 40])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 40])],
        [store.add("W", weight), numpy_helper.from_array(np.zeros(40, np.float32), "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    data = serialize(model)
    parsed = onnx.load_from_string(data)
    assert sorted(t.name for t in parsed.graph.initializer) == ["W", "b"]
    assert {k: v.tobytes() for k, v in _initializers(parsed).items()} == {k: v.tobytes() for k, v in _initializers(model).items()}
    x = np.random.default_rng(0).random((1, 40)).astype(np.float32)
    from_bytes = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    in_place = onnx_weights.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(from_bytes, in_place, rtol=1e-5, atol=1e-6)  # the same graph; ORT packs constant weights
    np.testing.assert_allclose(in_place, x @ weight.numpy(), rtol=1e-5, atol=1e-5)
    onnx_weights.checked(model)


@pytest.mark.parametrize("case", range(4))
def test_a_lean_export_writes_the_usual_file(case):
    # the bundled models and a torchvision net (its Identity nodes of shared weights): the weights left out of the
    # exporter and attached from its own dict give the file the exporter writes, and ONNX Runtime's outputs match
    name, model, inputs = export_cases()[case]
    gm = fxopt.trace(model, inputs)
    usual = export_onnx(gm, inputs, tensorrt_version="8.5", keep_weights_out=False)
    lean = export_onnx(gm, inputs, tensorrt_version="8.5", keep_weights_out=True)
    names = set(gm.state_dict())  # the module's weights (the rest are constants of the graph: shapes, masks)
    large = {t.name: len(t.raw_data) for t in usual.model.graph.initializer
             if t.name in names and len(t.raw_data) >= onnx_weights.EXTERNAL_MIN_BYTES}
    stored = {t.name for t in lean.model.graph.initializer if onnx_weights.is_stored(t)}
    assert lean.weights and stored >= set(large), name
    _same_file(lean.model, usual.model)
    for a, b in zip(run_onnx(lean, inputs), run_onnx(usual, inputs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lean_is_chosen_by_size_where_the_caller_lets_it(monkeypatch):
    # export_onnx's own model is self-contained unless asked (onnx.save of a lean one would write references);
    # compile lets it choose by size
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval(), (torch.randn(2, 64),)
    assert not is_lean(export_onnx(model, x, keep_weights_out=None).model)
    monkeypatch.setattr(onnx_backend, "LEAN_MIN_BYTES", 64 * 65 * 4)
    assert not is_lean(export_onnx(model, x).model)
    assert is_lean(export_onnx(model, x, keep_weights_out=None).model)
    assert is_lean(fxopt.compile(model, "cpu", example_inputs=x)._onnx)


def test_a_weight_no_store_holds_is_exported_as_usual():
    # numpy has no bfloat16: such a weight is written by the exporter, and the whole model with it
    model = nn.Linear(64, 64).to(torch.bfloat16).eval()
    exported = export_onnx(model, (torch.randn(1, 64, dtype=torch.bfloat16),), keep_weights_out=True)
    assert not is_lean(exported.model) and not exported.weights
    assert {t.data_type for t in exported.model.graph.initializer} == {onnx.TensorProto.BFLOAT16}


def _lean_everywhere(monkeypatch) -> None:
    monkeypatch.setattr(onnx_backend, "LEAN_MIN_BYTES", 0)


def test_a_lean_compile_saves_the_usual_file_and_refuses_weights_changed_since(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    usual = fxopt.compile(model, "xavier", example_inputs=(x,))
    _lean_everywhere(monkeypatch)
    compiled = fxopt.compile(model, "xavier", example_inputs=(x,))
    assert is_lean(compiled._onnx) and not is_lean(compiled.onnx_model)  # the property gives a self-contained model
    assert compiled.report.onnx["max_abs_error_vs_torch"] <= 1e-4 and usual.report.onnx["max_abs_error_vs_torch"] <= 1e-4
    assert compiled.report.onnx["inputs_checked"] == usual.report.onnx["inputs_checked"] > 1
    paths = compiled.save(tmp_path / "lean")  # written one weight at a time, hashed on the way
    saved = onnx.load(paths["onnx"])
    listed = json.loads((tmp_path / "lean" / "manifest.json").read_text())["files"]["model.onnx"]
    data = (tmp_path / "lean" / "model.onnx").read_bytes()
    assert listed == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _same_file(compiled._onnx, usual.onnx_model)
    got = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert len(saved.graph.initializer) == len(usual.onnx_model.graph.initializer)
    with torch.no_grad():
        next(compiled.graph_module.parameters()).add_(1.0)  # trained after compile: the file would no longer match
    with pytest.raises(WeightsChangedError):
        compiled.save(tmp_path / "after")
    assert not (tmp_path / "after").exists()


def test_a_lean_int8_compile_matches_the_usual_one(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    calib = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    usual = fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8", calib_data=calib)
    _lean_everywhere(monkeypatch)
    lean = fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8", calib_data=calib)
    assert is_lean(lean._onnx)
    _same_file(lean._onnx, usual.onnx_model)
    assert lean.report.onnx["max_error_in_output_int8_steps"] == usual.report.onnx["max_error_in_output_int8_steps"]  # the same file, run whole


class Branchy(nn.Module):
    """A data-dependent branch: a leaf, lowered with torch.jit.script as an ONNX If."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        if x.mean() > 0:
            return self.a(x)
        return self.b(x)


class WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.middle = nn.Linear(32, 32), Branchy()

    def forward(self, x):
        return self.middle(self.head(x))


def test_a_lean_dynamic_batch_and_scripted_branch_compile(monkeypatch):
    torch.manual_seed(0)
    model, x = WithLeaf().eval(), torch.randn(2, 32)
    _lean_everywhere(monkeypatch)
    compiled = fxopt.compile(model, "xavier", example_inputs=(x,), dynamic_batch=(1, 2, 4))
    assert compiled.report.onnx["lowered_by"] == "script" and "If" in {n.op_type for n in compiled.onnx_model.graph.node}
    assert compiled.report.onnx["batch_sizes_checked"] == [1, 2, 4]
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for sign in (1.0, -1.0):
        probe = sign * torch.rand(3, 32) + sign
        np.testing.assert_allclose(session.run(None, {"input": probe.numpy()})[0], model(probe).detach().numpy(), rtol=1e-4, atol=1e-5)


class FoldedHead(nn.Module):
    """Weights the exporter folds into new tensors (a cosine classifier's normalised weight, a scaled one) and a
    chain onnx-graphsurgeon folds further (exp(w1) + w2): the stored weights it evaluates are loaded for it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.g = nn.Parameter(torch.rand(64))
        self.w1, self.w2 = nn.Parameter(torch.randn(64, 64) * 0.1), nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        y = x @ nn.functional.normalize(self.w, dim=1).t()
        return y @ (self.w * self.g) + x @ (torch.exp(self.w1) + self.w2)


def test_weights_the_exporter_or_the_fold_computes_give_the_usual_file():
    torch.manual_seed(0)
    model, x = FoldedHead().eval(), (torch.randn(2, 64),)
    usual = export_onnx(model, x, keep_weights_out=False)
    lean = export_onnx(model, x, keep_weights_out=True)
    _same_file(lean.model, usual.model)


def test_a_write_into_a_weight_the_exporter_folded_is_seen(monkeypatch, tmp_path):
    # the file holds w * g, a tensor of the exporter's own: training g after the compile must not pass unseen
    torch.manual_seed(0)
    _lean_everywhere(monkeypatch)
    compiled = fxopt.compile(FoldedHead().eval(), "cpu", example_inputs=(torch.randn(2, 64),))
    with torch.no_grad():
        dict(compiled.graph_module.named_parameters())["g"].mul_(2)
    with pytest.raises(WeightsChangedError, match="'g'"):
        compiled.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_above_protobufs_limit_is_saved_with_external_data(monkeypatch, tmp_path):
    # the limit lowered to below this model's size: the weights go to model.onnx.data, which every reader finds
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval(), torch.randn(2, 256)
    _lean_everywhere(monkeypatch)
    compiled = fxopt.compile(model, "xavier", example_inputs=(x,))
    with pytest.raises(ExportError, match="above protobuf's 2 GiB"):
        monkeypatch.setattr(onnx_weights, "PROTOBUF_LIMIT", 64 * 1024)
        serialize(compiled._onnx)
    import fxopt.compiler as compiler_module

    monkeypatch.setattr(compiler_module, "PROTOBUF_LIMIT", 64 * 1024)
    paths = compiled.save(tmp_path / "big")
    assert set(paths) >= {"onnx", "onnx_data"} and os.path.getsize(paths["onnx"]) < 8 * 1024
    onnx.checker.check_model(paths["onnx"], full_check=True)
    loaded = onnx.load(paths["onnx"])  # external data read from beside it
    monkeypatch.setattr(onnx_weights, "PROTOBUF_LIMIT", 2**31 - 1)
    assert {k: v.tobytes() for k, v in _initializers(loaded).items()} == {k: v.tobytes() for k, v in _initializers(compiled._onnx).items()}
    got = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())["files"]
    assert manifest["model.onnx.data"]["bytes"] == os.path.getsize(tmp_path / "big" / "model.onnx.data")


def test_a_scripted_graph_is_exported_with_its_weights():
    # with its weights left out the exporter names a scripted module's nodes differently: the usual export instead
    torch.manual_seed(0)
    exported = export_onnx(fxopt.trace(WithLeaf().eval(), (torch.randn(2, 32),)), (torch.randn(2, 32),), keep_weights_out=True)
    assert exported.lowered_by == "script" and not is_lean(exported.model) and not exported.weights


def test_an_edited_onnx_model_set_back_is_what_save_writes(monkeypatch, tmp_path):
    _lean_everywhere(monkeypatch)
    model, x = nn.Sequential(nn.Linear(32, 32), nn.ReLU()).eval(), torch.randn(2, 32)
    compiled = fxopt.compile(model, "cpu", example_inputs=(x,))
    edited = compiled.onnx_model  # a self-contained copy: editing it alone changes nothing saved
    edited.doc_string = "edited"
    assert is_lean(compiled._onnx) and compiled.onnx_model.doc_string != "edited"
    compiled.onnx_model = edited
    assert not is_lean(compiled._onnx)
    assert onnx.load(compiled.save(tmp_path / "out")["onnx"]).doc_string == "edited"
