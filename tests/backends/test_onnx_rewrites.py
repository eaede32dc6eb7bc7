"""ONNX rewrites for older TensorRT: LayerNormalization decomposed, checked in ONNX Runtime against torch."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from fxopt.backends.onnx import export_onnx, run_onnx
from fxopt.backends.tensorrt_compat import check_tensorrt_compat

PRIMITIVES = {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul"}


def layer_norm(shape, affine=True, bias=True, seed=0):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(shape, elementwise_affine=affine, bias=bias).eval()
    if affine:
        with torch.no_grad():
            ln.weight.normal_()
            if bias:
                ln.bias.normal_()
    return ln


@pytest.mark.parametrize("shape, normalized, affine, bias", [
    ((4, 16, 64), 64, True, True),           # the transformer case: last axis
    ((2, 5, 6, 8), (6, 8), True, True),      # two normalised axes
    ((3, 32), 32, True, False),              # no bias
    ((3, 32), 32, False, False),             # no affine
])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])  # small, unit and large variance
def test_layer_norm_decomposition_matches_torch_in_onnx_runtime(shape, normalized, affine, bias, scale):
    ln = layer_norm(normalized, affine, bias)
    before = export_onnx(ln, (torch.randn(shape),))
    after = export_onnx(ln, (torch.randn(shape),), tensorrt_version="8.5")
    assert before.op_types() >= {"LayerNormalization"}                       # Before
    assert "LayerNormalization" not in after.op_types() and after.op_types() >= PRIMITIVES  # Expected
    assert after.rewrites and after.rewrites[0].startswith("1 x LayerNormalization")
    onnx.checker.check_model(after.model, full_check=True)
    for seed in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
        reference = torch.nn.functional.layer_norm(
            x.double(), ln.normalized_shape,
            None if ln.weight is None else ln.weight.double(), None if ln.bias is None else ln.bias.double(), ln.eps,
        )
        got = torch.from_numpy(run_onnx(after, (x,))[0]).double()
        native = torch.from_numpy(run_onnx(before, (x,))[0]).double()
        assert (got - reference).abs().max() <= 1e-5
        assert (got - native).abs().max() <= 1e-5


def test_no_rewrite_for_a_release_that_imports_layer_norm():
    ln = layer_norm(8)
    for version in (None, "8.6", "10.0"):
        exported = export_onnx(ln, (torch.randn(2, 8),), tensorrt_version=version)
        assert "LayerNormalization" in exported.op_types() and exported.rewrites == []


def test_rewritten_file_passes_the_8_5_check_and_the_original_does_not():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm1, self.norm2, self.fc = nn.LayerNorm(16), nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
            return self.norm2(x + self.fc(x))

    x = (torch.randn(2, 5, 16),)
    model = Encoder().eval()
    assert not check_tensorrt_compat(export_onnx(model, x).model, "8.5").ok
    after = export_onnx(model, x, tensorrt_version="8.5")
    assert check_tensorrt_compat(after.model, "8.5").ok
    assert after.rewrites[0].startswith("2 x LayerNormalization")
    want = model(*x).detach()
    assert (torch.from_numpy(run_onnx(after, x)[0]) - want).abs().max() <= 1e-5


def test_layer_norm_as_the_graph_output_keeps_the_output_name():
    exported = export_onnx(layer_norm(8), (torch.randn(2, 8),), tensorrt_version="8.5")
    assert [o.name for o in exported.model.graph.output] == ["output"]
