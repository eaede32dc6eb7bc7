"""Regressions found by the model zoo, each reproduced by a tiny hand-written module."""

from __future__ import annotations

import torch
from fxopt.passes.canonicalize import Canonicalize
from torch import nn

import fxopt
from fxopt.numerics import compare_outputs


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
