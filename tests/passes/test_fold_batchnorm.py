"""fold_batchnorm: Before / Expected graphs per producer kind, the cases it must leave alone, and its contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import fxopt
from fxopt.passes.fold_batchnorm import FoldBatchNorm, fold_bn_into
from fxopt.testing import check_pass


def graph_of(gm: GraphModule) -> list[str]:
    """The graph as one line a node: ``target:ModuleType`` for modules, the node name otherwise."""
    return [
        f"{n.target}:{type(gm.get_submodule(str(n.target))).__name__}" if n.op == "call_module" else n.name
        for n in gm.graph.nodes
    ]


def with_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold shows in the outputs."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=gen))
                m.bias.data.copy_(torch.randn(c, generator=gen))
    return model.eval()


def run_pass(model: nn.Module, x: torch.Tensor) -> tuple[GraphModule, GraphModule, bool]:
    """(Before graph, graph after the pass, modified); the outputs must match."""
    torch.manual_seed(0)
    before = fxopt.trace(with_statistics(model), x)
    result = FoldBatchNorm()(copy.deepcopy(before))
    result.graph_module.recompile()  # the PassManager's step after every pass
    torch.testing.assert_close(result.graph_module(x), before(x), rtol=1e-5, atol=1e-5)
    return before, result.graph_module, result.modified


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class OneBNTwoConvs(nn.Module):
    """One BatchNorm module after two convs: each conv takes the same statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.bn(self.b(x))


# (model, input, Before, Expected)
FOLDABLE = {
    "conv2d": (
        ConvBN(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), torch.randn(2, 3, 6, 6),
        ["x", "conv:Conv2d", "bn:BatchNorm2d", "relu", "output"],
        ["x", "conv:Conv2d", "relu", "output"],
    ),
    "conv2d without bias, BN without affine": (
        ConvBN(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False)), torch.randn(2, 3, 6, 6),
        ["x", "conv:Conv2d", "bn:BatchNorm2d", "relu", "output"],
        ["x", "conv:Conv2d", "relu", "output"],
    ),
    "grouped conv1d": (
        ConvBN(nn.Conv1d(4, 8, 3, groups=2), nn.BatchNorm1d(8)), torch.randn(2, 4, 9),
        ["x", "conv:Conv1d", "bn:BatchNorm1d", "relu", "output"],
        ["x", "conv:Conv1d", "relu", "output"],
    ),
    "linear": (
        ConvBN(nn.Linear(5, 7), nn.BatchNorm1d(7)), torch.randn(4, 5),
        ["x", "conv:Linear", "bn:BatchNorm1d", "relu", "output"],
        ["x", "conv:Linear", "relu", "output"],
    ),
    "conv transpose": (
        ConvBN(nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6)), torch.randn(2, 3, 5, 5),
        ["x", "conv:ConvTranspose2d", "bn:BatchNorm2d", "relu", "output"],
        ["x", "conv:ConvTranspose2d", "relu", "output"],
    ),
    "one BN module after two convs": (
        OneBNTwoConvs(), torch.randn(2, 3, 6, 6),
        ["x", "a:Conv2d", "bn:BatchNorm2d", "b:Conv2d", "bn:BatchNorm2d", "add", "output"],
        ["x", "a:Conv2d", "b:Conv2d", "add", "output"],
    ),
}


@pytest.mark.parametrize("case", FOLDABLE)
def test_batchnorm_folds_into_its_producer(case):
    model, x, before_graph, expected = FOLDABLE[case]
    before, after, modified = run_pass(model, x)
    assert graph_of(before) == before_graph
    assert modified
    assert graph_of(after) == expected
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in after.modules())  # the BN submodule is gone


class SharedOutput(nn.Module):
    """The conv's output feeds the BN and the output: folding would change the second use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


class ConvCalledTwice(nn.Module):
    """One conv module (tied weights) called twice, once before the BN: folding would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


class BNAfterAFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


class LinearOnTokens(nn.Module):
    """BatchNorm1d on (N, C, L) normalises dim 1, which a linear on (N, C, F) does not produce."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


# (model, input, Before = Expected)
NOT_FOLDABLE = {
    "conv output shared": (SharedOutput(), torch.randn(2, 3, 4, 4), ["x", "conv:Conv2d", "bn:BatchNorm2d", "output"]),
    "conv called twice": (
        ConvCalledTwice(), torch.randn(2, 4, 4, 4), ["x", "conv:Conv2d", "bn:BatchNorm2d", "mul", "conv:Conv2d", "add", "output"],
    ),
    "BN after a function": (BNAfterAFunction(), torch.randn(2, 3, 4, 4), ["x", "conv:Conv2d", "relu", "bn:BatchNorm2d", "output"]),
    "linear on 3-D input": (LinearOnTokens(), torch.randn(2, 3, 6), ["x", "fc:Linear", "bn:BatchNorm1d", "output"]),
    "grouped conv transpose": (
        ConvBN(nn.ConvTranspose2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)), torch.randn(2, 4, 5, 5),
        ["x", "conv:ConvTranspose2d", "bn:BatchNorm2d", "relu", "output"],
    ),
}


@pytest.mark.parametrize("case", NOT_FOLDABLE)
def test_batchnorm_that_cannot_fold_is_left_alone(case):
    model, x, before_graph = NOT_FOLDABLE[case]
    before, after, modified = run_pass(model, x)
    assert graph_of(before) == before_graph
    assert not modified
    assert graph_of(after) == before_graph  # Expected = Before
    torch.testing.assert_close(after.state_dict(), before.state_dict(), rtol=0, atol=0)


def test_batchnorm_in_train_mode_is_left_alone():
    x = torch.randn(4, 3, 5, 5)
    gm = fxopt.trace(with_statistics(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), x)
    gm.bn.train()  # fxopt.trace hands back eval mode; a graph put back into training must keep batch statistics
    before_graph = graph_of(gm)
    result = FoldBatchNorm()(gm)
    assert not result.modified
    assert graph_of(result.graph_module) == before_graph == ["x", "conv:Conv2d", "bn:BatchNorm2d", "relu", "output"]


def test_batchnorm_without_running_statistics_is_left_alone():
    x = torch.randn(4, 3, 5, 5)
    gm = fxopt.trace(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), x)
    before = copy.deepcopy(gm)
    result = FoldBatchNorm()(gm)
    assert not result.modified
    assert graph_of(result.graph_module) == graph_of(before)
    result.graph_module.recompile()
    torch.testing.assert_close(result.graph_module(x), before(x), rtol=0, atol=0)


def test_fold_bn_into_leaves_its_inputs_alone():
    conv, bn = nn.Conv2d(3, 4, 3), with_statistics(nn.BatchNorm2d(4))
    weight = conv.weight.detach().clone()
    fused = fold_bn_into(conv, bn)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.weight, weight) and fused is not conv
    assert fused.weight is not conv.weight and fused.bias is not conv.bias  # new tensors, the old ones untouched
    bias_free = nn.Conv2d(3, 4, 3, bias=False)
    folded = fold_bn_into(bias_free, bn)
    assert bias_free.bias is None and folded.bias is not None
    torch.testing.assert_close(folded(x), bn(bias_free(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [*FOLDABLE, *NOT_FOLDABLE])
def test_contract(case):
    model, x, *_ = FOLDABLE.get(case) or NOT_FOLDABLE[case]
    check = check_pass("fold_batchnorm", with_statistics(model), (x,))
    assert check.modified == (case in FOLDABLE)
