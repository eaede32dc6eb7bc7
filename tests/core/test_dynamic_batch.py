"""`compile(dynamic_batch=(min, opt, max))`: a symbolic batch axis in the ONNX file, verified in ONNX
Runtime at each size, and the matching TensorRT optimisation profile in the build plan."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxopt
from fxopt.backends.onnx import batch_inputs
from fxopt.backends.tensorrt import build_plan
from fxopt.errors import InputError, VerificationError


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


X = (torch.randn(1, 3, 16, 16),)


def test_symbolic_batch_axis_verified_at_each_size_and_in_the_build_plan():
    compiled = fxopt.compile(net(), "xavier", example_inputs=X, dynamic_batch=(1, 4, 8))
    dims = compiled.onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert compiled.onnx_model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert compiled.report.onnx["batch_sizes_checked"] == [1, 4, 8]
    assert compiled.manifest["dynamic_batch"] == [1, 4, 8]
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # any size in the range runs
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], net()(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    script = compiled.report.extras["files"]["build_engine.sh"]
    gpu_line = next(line for line in script.splitlines() if line.startswith("trtexec") and "useDLACore" not in line)
    assert "--minShapes=input:1x3x16x16" in gpu_line and "--optShapes=input:4x3x16x16" in gpu_line
    assert "--maxShapes=input:8x3x16x16" in gpu_line
    dla_line = next(line for line in script.splitlines() if "useDLACore" in line)
    assert "--minShapes=input:4x3x16x16" in dla_line and "--maxShapes=input:4x3x16x16" in dla_line  # DLA: static at opt
    assert "shapes={'input':" in compiled.report.extras["files"]["build_engine.py"]


def test_static_shapes_stay_the_default():
    compiled = fxopt.compile(net(), "xavier", example_inputs=X)
    assert compiled.onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert "Shapes=" not in compiled.report.extras["files"]["build_engine.sh"]
    assert build_plan("xavier", "fp16").trtexec == build_plan("xavier", "fp16", shapes=None).trtexec


def test_a_model_that_fixes_its_batch_size_is_refused_naming_the_size():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(x.reshape(1, -1))  # the batch size is baked in

    with pytest.raises(VerificationError, match="at batch size 2"):
        fxopt.compile(Fixed().eval(), "cpu", example_inputs=(torch.randn(1, 3, 4, 4),), dynamic_batch=(1, 2, 4))


@pytest.mark.parametrize("bad", [(4, 2, 8), (0, 1, 2), (1, 2), "1,2,3", (1, 2.0, 3)])
def test_bad_dynamic_batch_is_an_input_error(bad):
    with pytest.raises(InputError, match="dynamic_batch"):
        fxopt.compile(net(), "cpu", example_inputs=X, dynamic_batch=bad)


def test_batch_inputs_repeat_and_cut_rows():
    x, idx = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]])
    big, big_idx = batch_inputs((x, idx), 5)
    assert big.shape == (5, 3) and torch.equal(big_idx, idx.repeat(3, 1)[:5])
    assert not torch.equal(big[0], big[2])  # noise keeps repeated rows apart
    assert batch_inputs((x,), 1)[0].shape == (1, 3)
