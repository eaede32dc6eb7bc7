"""TensorRT lowering on a host without TensorRT: build plans and DLA placement from TensorRT 8.5's rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.backends.onnx import export_onnx
from fxopt.backends.tensorrt import (
    build_engine,
    build_plan,
    dla_placement,
    placement_summary,
    tensorrt_available,
)


def placements(model, *inputs, target="xavier", precision="fp16"):
    exported = export_onnx(model.eval(), inputs, opset=17)
    return {r.op_type: r for r in dla_placement(exported.model, target, precision)}


def test_plain_convnet_is_dla_eligible():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 1))
    rows = placements(model, torch.randn(1, 3, 32, 32))
    assert {op: r.device for op, r in rows.items()} == {"Conv": "DLA", "Relu": "DLA", "MaxPool": "DLA"}


@pytest.mark.parametrize(
    "module, shape, op, reason",
    [
        (nn.Conv2d(3, 4, 33), (1, 3, 40, 40), "Conv", "kernel [33, 33] outside [1, 32]"),
        (nn.Conv2d(3, 4, 3, stride=9), (1, 3, 40, 40), "Conv", "stride [9, 9] outside [1, 8]"),
        (nn.Conv1d(3, 4, 3), (1, 3, 40), "Conv", "only 2-D convolution"),
        (nn.MaxPool2d(9), (1, 3, 40, 40), "MaxPool", "pooling window [9, 9] outside [1, 8]"),
        (nn.AdaptiveAvgPool2d(1), (1, 3, 16, 16), "GlobalAveragePool", "pooling window [16, 16]"),
        (nn.Softmax(dim=1), (1, 3, 4, 4), "Softmax", "no DLA implementation"),
    ],
)
def test_rules_send_unsupported_layers_to_gpu(module, shape, op, reason):
    row = placements(module, torch.randn(shape))[op]
    assert row.device == "GPU" and reason in row.reason


def test_concat_only_along_channels():
    class Cat(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, a, b):
            return torch.cat([a, b], dim=self.dim)

    x = (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    assert placements(Cat(1), *x)["Concat"].device == "DLA"
    assert placements(Cat(2), *x)["Concat"].device == "GPU"


def test_orin_runs_softmax_on_dla_and_fp32_never_on_dla():
    assert placements(nn.Softmax(dim=1), torch.randn(1, 3, 4, 4), target="orin")["Softmax"].device == "DLA"
    rows = placements(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), precision="fp32")
    assert rows["Conv"].device == "GPU" and "fp32" in rows["Conv"].reason


def test_cpu_target_has_no_dla():
    exported = export_onnx(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(fxopt.TargetError, match="no DLA cores"):
        dla_placement(exported.model, "cpu")


def test_build_plan_flags():
    plan = build_plan("xavier", "int8", dla_core=1)
    assert plan.trtexec[:2] == ["trtexec", "--onnx=model.onnx"]
    assert {"--fp16", "--int8", "--useDLACore=1", "--allowGPUFallback"} <= set(plan.trtexec)
    assert "build_engine('model.onnx', 'engine.plan', precision='int8', dla_core=1" in plan.script
    compile(plan.script, "build_engine.py", "exec")  # the script is valid Python
    assert "--fp16" not in build_plan("xavier", "fp32").trtexec
    with pytest.raises(fxopt.TargetError, match="DLA cores 0..1"):
        build_plan("xavier", "fp16", dla_core=2)
    with pytest.raises(fxopt.TargetError, match="does not use TensorRT"):
        build_plan("cpu", "fp32")


@pytest.mark.skipif(tensorrt_available(), reason="this host can build engines")
def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(fxopt.TargetError, match="needs the `tensorrt` package and a CUDA GPU"):
        build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "e.plan"))
    assert not (tmp_path / "e.plan").exists()


def test_compile_for_xavier_saves_plan_and_placement(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    compiled = fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 3, 8, 8),))
    compiled.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"build_engine.sh", "build_engine.py", "placement.md", "model.onnx"} <= names
    assert "--useDLACore=0" in (tmp_path / "build_engine.sh").read_text()
    conv_row = [r for r in compiled.report.layers if r.op == "Conv2d"][0]
    assert conv_row.placement == "DLA"
    assert any("DLA:" in n for n in compiled.report.notes)
    cpu = fxopt.compile(model, "cpu", example_inputs=(torch.randn(1, 3, 8, 8),))
    assert "files" not in cpu.report.extras


def test_placement_summary_counts_switches():
    exported = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), (torch.randn(1, 3, 8, 8),))
    summary = placement_summary(dla_placement(exported.model, "xavier", "fp16"))
    assert summary["dla"] >= 2 and summary["gpu"] >= 1 and summary["switches"] >= 2
