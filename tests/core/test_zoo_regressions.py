"""Regressions found by the model zoo, each reproduced by a tiny hand-written module."""

from __future__ import annotations

import torch
from torch import nn

import fxopt
from fxopt.passes.canonicalize import Canonicalize
from fxopt.verification.numerics import compare_outputs


class ChannelShuffle(nn.Module):
    """transpose -> contiguous -> view, as in ShuffleNet and Swin V2 (torchvision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return x.view(b, c, h, w).contiguous() + 1


def test_canonicalize_keeps_contiguous_that_a_view_needs():
    x = torch.randn(1, 4, 3, 3)
    gm = fxopt.trace(ChannelShuffle(), x)
    result = Canonicalize()(gm)
    # Expected: the first contiguous (after transpose) stays, the second (already contiguous) goes
    kept = [n for n in result.graph_module.graph.nodes if n.target == "contiguous"]
    assert result.modified and len(kept) == 1 and kept[0].args[0].target == "transpose"
    result.graph_module.recompile()
    assert torch.equal(result.graph_module(x), ChannelShuffle()(x))


def test_compile_does_not_roll_back_canonicalize_on_channel_shuffle():
    x = torch.randn(1, 4, 3, 3)
    compiled = fxopt.compile(ChannelShuffle(), "cpu", example_inputs=(x,))
    assert [r.status for r in compiled.report.passes if r.name == "canonicalize"] == ["applied"]
    assert compare_outputs(compiled(x), ChannelShuffle()(x)).max_abs == 0.0


class OptionalMask(nn.Module):
    """An optional forward argument, as in timm's Hiera (mask=None) and ViT (is_causal=False)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if mask is not None:  # an identity test: a Proxy for `mask` would always take this branch
            x = x * mask
        q = x.view(1, 1, x.shape[1], -1)
        return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=is_causal)


def test_forward_defaults_the_inputs_leave_out_are_kept_not_traced():
    x = torch.randn(1, 6, 4)
    gm = fxopt.trace(OptionalMask(), x)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    torch.testing.assert_close(gm(x), OptionalMask()(x))
    # the exporter used to get is_causal as a tensor input and fail
    compiled = fxopt.compile(OptionalMask(), "cpu", example_inputs=(x,))
    assert compiled.report.onnx["inputs"] == ["input"]


class ShapeBranch(nn.Module):
    """Control flow on shapes in the root, as in timm's CrossViT, Hiera, NesT, MobileViT."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[-1] != 8:  # resize to the size the model was built for
            x = nn.functional.interpolate(x, size=(8, 8))
        heads = int(x.shape[1]) // 2
        assert len(x.shape) == 4
        with torch.autocast(device_type=x.device.type, enabled=False):
            return x.reshape(heads, -1, 8 * 8).softmax(-1)


def test_shape_only_control_flow_is_specialised_and_recorded():
    x, model = torch.randn(1, 3, 6, 6), ShapeBranch()
    gm = fxopt.trace(model, x)
    assert not fxopt.leaves_of(gm)
    assert "interpolate" in str(gm.graph)
    specialised = fxopt.frontend.tracing.specialisations_of(gm)
    assert any("x.shape[-1] != 8" in s and s.endswith("True") for s in specialised)
    torch.testing.assert_close(gm(x), model(x))


class ValueShaped(nn.Module):
    """A branch on the shape of nonzero(): depends on the data, so it must not be specialised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.nonzero().shape[0] > 2:
            return x + 1
        return x - 1


class HoldsValueShaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = ValueShaped()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x))


def test_branch_on_value_dependent_shape_becomes_a_leaf():
    gm = fxopt.trace(HoldsValueShaped(), torch.randn(2, 4))
    assert [leaf.path for leaf in fxopt.leaves_of(gm)] == ["inner"]
    assert not fxopt.frontend.tracing.specialisations_of(gm)


def test_torchvision_frames_count_as_user_code_in_trace_errors():
    import os

    from fxopt.frontend.tracing import _is_internal

    torch_dir = os.path.dirname(torch.__file__)
    assert _is_internal(os.path.join(torch_dir, "fx", "proxy.py"))
    assert not _is_internal(os.path.join(torch_dir + "vision", "models", "detection", "_utils.py"))
