"""Which nodes the xavier engine model fuses into one kernel: the rows of TensorRT's fusion list it follows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.costs.cost_model import estimate_costs

X = torch.randn(1, 32, 28, 28)


def kernels(model: nn.Module, x: torch.Tensor = X) -> dict[str, tuple[str, bool, str]]:
    """Per computing node: (kind, heads a kernel, the kernel it is fused into)."""
    summary = estimate_costs(fxopt.trace(model.eval(), (x,)), "xavier", "fp16")
    return {n: (c.kind, c.latency_s > 0, c.fused_into) for n, c in summary.per_node.items() if c.kind != "view"}


def latency(model: nn.Module, x: torch.Tensor = X) -> float:
    return estimate_costs(fxopt.trace(model.eval(), (x,)), "xavier", "fp16").latency_s


class ConvThen(nn.Module):
    def __init__(self, tail) -> None:
        super().__init__()
        self.conv, self.tail = nn.Conv2d(32, 32, 3, padding=1), tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(x))


@pytest.mark.parametrize("activation", [
    lambda y: y * torch.sigmoid(y),        # SiLU as two nodes
    lambda y: y * F.relu6(y + 3) / 6,      # hardswish as four nodes
    lambda y: torch.clamp(y, 0) * torch.tanh(y) + y,
])
def test_a_pointwise_subgraph_with_one_input_and_one_output_fuses_into_the_conv(activation):
    # TensorRT: PointWise fusion, then "Convolution and Generic Activation"
    fused = kernels(ConvThen(activation))
    assert fused["conv"][1] and all(fused_into == "conv" and not heads for name, (_, heads, fused_into) in fused.items() if name != "conv")
    assert latency(ConvThen(activation)) == pytest.approx(latency(ConvThen(nn.SiLU())), rel=0.01)  # costs as a fused module


def test_a_pointwise_subgraph_that_reads_another_tensor_is_no_generic_activation():
    class Gate(nn.Module):  # y * sigmoid(y + x) reads x too: two inputs, a pointwise kernel of its own after the conv
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(y + x)

    k = kernels(Gate())
    assert k["add"][1] and k["sigmoid"][2] == k["mul"][2] == "add"
    assert sum(heads for _, heads, _ in k.values()) == 2


def test_squeeze_excitation_keeps_its_pool_and_its_scale_as_kernels():
    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))

    k = kernels(SE())
    # conv, pool, fc + hardsigmoid, the broadcast multiply: no row of the fusion list joins them further
    assert k["adaptive_avg_pool2d"] == ("pool", True, "") and k["hardsigmoid"][2] == "fc" and k["mul"][1]
    assert sum(heads for _, heads, _ in k.values()) == 4


@pytest.mark.parametrize("tail, kind", [
    (lambda y: F.adaptive_avg_pool2d(y, 1), "pool"),          # Pooling
    (lambda y: y.mean((2, 3), keepdim=True), "pool"),         # Reduce (average over H, W runs as Pooling)
    (lambda y: F.max_pool2d(y, 2), "pool"),
    (lambda y: torch.softmax(y, dim=1), "elementwise"),       # SoftMax
    (lambda y: F.interpolate(y, scale_factor=2.0), "elementwise"),  # Resize
])
def test_pools_reductions_softmax_and_resize_are_kernels_of_their_own(tail, kind):
    k = kernels(ConvThen(tail))
    (name, (got_kind, heads, fused_into)), = [(n, v) for n, v in k.items() if n != "conv"]
    assert (got_kind, heads, fused_into) == (kind, True, ""), name


def test_a_functional_pool_costs_like_the_module():
    class Fn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(x, 1) + F.max_pool2d(x, 2).mean((2, 3), keepdim=True)

    class Mod(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gap, self.pool, self.gap2 = nn.AdaptiveAvgPool2d(1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gap(x) + self.gap2(self.pool(x))

    x = torch.randn(1, 64, 64, 64)
    fn, mod = estimate_costs(fxopt.trace(Fn(), (x,)), "xavier", "fp16"), estimate_costs(fxopt.trace(Mod(), (x,)), "xavier", "fp16")
    assert sorted(c.kind for c in fn.per_node.values() if c.latency_s > 0) == ["elementwise", "pool", "pool", "pool"]
    assert fn.latency_s == pytest.approx(mod.latency_s, rel=0.01)
    assert fn.flops == mod.flops


def test_static_broadcast_is_torchs():
    import random

    from fxopt.costs.engine_cost import _broadcast

    rng = random.Random(0)
    for _ in range(5000):
        shapes = [tuple(rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 3))]
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expected = None
        assert _broadcast(shapes) == expected, shapes
