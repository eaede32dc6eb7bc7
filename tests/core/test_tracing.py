"""Tracing: automatic leaves, clear errors, shapes on every node, the user's model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.frontend.tracing import leaves_of


class DataDependent(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: not symbolically traceable
            return x * 2
        return x - 1


class WithBadBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = DataDependent()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.bn(self.stem(x))))


class RootControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y
        return -y


def snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, repr(model), model.training


def test_untraceable_block_becomes_leaf_and_rest_is_traced():
    model = WithBadBlock()
    gm = fxopt.trace(model, torch.randn(1, 3, 8, 8))
    leaves = leaves_of(gm)
    assert [leaf.path for leaf in leaves] == ["gate"]
    assert "control flow" in leaves[0].reason
    assert leaves[0].module_type == "DataDependent"
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == ["stem", "bn", "gate", "head"]


def test_leaf_model_compiles_and_report_names_the_leaf():
    model = WithBadBlock()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(model, "cpu", example_inputs=(x,))
    assert [leaf.path for leaf in compiled.report.leaves] == ["gate"]
    assert "gate" in str(compiled.report)
    torch.testing.assert_close(compiled(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def test_root_level_control_flow_raises_trace_error_with_line():
    with pytest.raises(fxopt.TraceError) as info:
        fxopt.trace(RootControlFlow(), torch.randn(2, 4))
    message = str(info.value)
    assert "<root>" in message
    assert "test_tracing.py" in message and "y.sum() > 0" in message


def test_user_model_is_never_mutated():
    model = WithBadBlock().train()
    before = snapshot(model)
    fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 3, 8, 8),))
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2] is True
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key


def test_every_node_has_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = fxopt.trace(model, torch.randn(2, 3, 8, 8))
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"}
    assert list(shapes.values())[0] == (2, 3, 8, 8)
    assert list(shapes.values())[-1] == (2, 2)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes)


def test_requested_leaf_modules_stay_opaque():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    gm = fxopt.trace(model, torch.randn(1, 4), leaf_modules=["0"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert leaves_of(gm)[0].reason == "requested by the user"


@pytest.mark.parametrize(
    "inputs, match",
    [((), "non-empty tuple"), ("text", "non-empty tuple"), ((torch.randn(1, 5),), "does not run on the example inputs")],
)
def test_bad_example_inputs_raise_input_error(inputs, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.trace(nn.Linear(4, 2), inputs)


def test_not_a_module_raises_input_error():
    with pytest.raises(fxopt.InputError, match="torch.nn.Module"):
        fxopt.trace(lambda x: x, (torch.randn(1),))
