"""compile(precision="int8", qat_steps=N): quantisation-aware training on the calibrated fake-quantised graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxopt


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    data = [((x[i:i + 16],), y[i:i + 16]) for i in range(0, 64, 16)]
    return model, x, data, [(x[i:i + 1],) for i in range(8)]


def _onnx_outputs(compiled, x):
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]


def test_qat_trains_the_fake_quantised_graph_and_ships_it():
    model, x, data, calib = _setup()
    common = {"example_inputs": (x[:1],), "precision": "int8", "calib_data": calib}
    ptq = fxopt.compile(model, "xavier", **common)
    qat = fxopt.compile(model, "xavier", **common, qat_steps=6, train_data=data, loss=nn.CrossEntropyLoss(),
                        distill="kd", finetune_lr=3e-3)
    stages = [row["stage"] for row in qat.report.tables["summary: input model and after each step"]]
    assert stages == ["input model", "after int8", "after QAT"]
    assert any(n.startswith("QAT: 6 steps") for n in qat.report.notes)
    assert qat.manifest["precision"] == "int8"
    assert any(n.op_type == "QuantizeLinear" for n in qat.onnx_model.graph.node)
    # the shipped file is the trained one: it differs from PTQ's, and matches its own torch graph
    assert not np.allclose(_onnx_outputs(ptq, x), _onnx_outputs(qat, x))
    assert model[0].weight.grad is None  # the user's model is untouched


@pytest.mark.parametrize("options, match", [
    ({"precision": "fp16", "qat_steps": 5}, "needs precision='int8'"),
    ({"precision": "int8", "qat_steps": -1}, "qat_steps must be an integer >= 0"),
    ({"precision": "int8", "qat_steps": 5, "train_data": None}, "qat_steps needs train_data="),
])
def test_bad_qat_requests_are_input_errors(options, match):
    model, x, data, calib = _setup()
    kwargs = {"train_data": data, "loss": nn.CrossEntropyLoss(), **options}
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.compile(model, "xavier", example_inputs=(x[:1],), calib_data=calib, **kwargs)
