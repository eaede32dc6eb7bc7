"""The cost model against hand-computed FLOPs, parameters and roofline behaviour."""

from __future__ import annotations

import torch
from torch import nn

import fxopt
from fxopt.cost_model import estimate_costs


def costs_by_kind(model, *inputs, target="xavier", precision=None):
    # a lone conv/linear root is traced through its forward, so wrap it to keep the module call
    model = nn.Sequential(model) if type(model) in (nn.Conv2d, nn.Linear) else model
    gm = fxopt.trace(model, inputs)
    summary = estimate_costs(gm, target, precision)
    return summary, [c for c in summary.per_node.values() if c.kind != "view"]


def test_conv_flops_and_params():
    summary, [conv] = costs_by_kind(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16))
    macs = 8 * 16 * 16 * 3 * 9
    assert conv.kind == "conv"
    assert conv.flops == 2 * macs + 8 * 16 * 16
    assert conv.params == summary.params == 8 * 3 * 9 + 8


def test_depthwise_and_grouped_conv():
    _, [dw] = costs_by_kind(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.randn(1, 8, 8, 8))
    assert dw.kind == "conv_depthwise" and dw.flops == 2 * 8 * 8 * 8 * 9
    _, [grouped] = costs_by_kind(nn.Conv2d(8, 16, 1, groups=4, bias=False), torch.randn(1, 8, 4, 4))
    assert grouped.kind == "conv" and grouped.flops == 2 * 16 * 4 * 4 * 2


def test_linear_matmul_and_attention():
    _, [lin] = costs_by_kind(nn.Linear(8, 4), torch.randn(2, 8))
    assert lin.flops == 2 * 2 * 4 * 8 + 2 * 4

    class MatMul(nn.Module):
        def forward(self, a, b):
            return a @ b

    _, [mm] = costs_by_kind(MatMul(), torch.randn(2, 3, 5), torch.randn(2, 5, 7))
    assert mm.kind == "matmul" and mm.flops == 2 * 2 * 3 * 7 * 5

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    _, nodes = costs_by_kind(Attn(), torch.randn(1, 10, 16))
    mha = [c for c in nodes if c.kind == "matmul"][0]
    # projections 4 * L * E^2 plus scores and weighted sum 2 * L^2 * E, as MACs
    assert mha.flops == 2 * (4 * 10 * 16 * 16 + 2 * 10 * 10 * 16)


def test_pooling_norm_elementwise():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    _, (bn, relu, pool, gap) = costs_by_kind(model.eval(), torch.randn(1, 4, 8, 8))
    assert (bn.kind, bn.flops) == ("norm", 2 * 256)
    assert (relu.kind, relu.flops) == ("elementwise", 256)
    assert (pool.kind, pool.flops) == ("pool", 64 * 4)
    assert (gap.kind, gap.flops) == ("pool", 64)


def test_roofline_lower_precision_is_not_slower_and_moves_fewer_bytes():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    x = torch.randn(1, 16, 32, 32)
    fp32, _ = costs_by_kind(model, x, precision="fp32")
    fp16, _ = costs_by_kind(model, x, precision="fp16")
    int8, _ = costs_by_kind(model, x, precision="int8")
    assert fp32.bytes == 2 * fp16.bytes == 4 * int8.bytes
    assert fp32.latency_s > fp16.latency_s >= int8.latency_s > 0
    assert fp32.flops == fp16.flops


def test_unknown_leaf_is_reported_not_guessed():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else x

    model = nn.Sequential(nn.Linear(4, 4), Opaque())
    summary, _ = costs_by_kind(model, torch.randn(1, 4))
    assert summary.unknown_nodes == ("_1",)
    assert summary.per_node["_1"].params == 20


def test_functional_linear_counts_its_bias():
    gm = fxopt.trace(nn.Linear(8, 4), (torch.randn(2, 8),))  # traced through F.linear
    assert estimate_costs(gm, "cpu").flops == 2 * 2 * 4 * 8 + 2 * 4
