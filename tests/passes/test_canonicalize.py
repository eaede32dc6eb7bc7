"""canonicalize: Before / Expected graphs per no-op rule and for dead code, what it must keep, and its contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

import fxopt
from fxopt.passes.canonicalize import NOOP_RULES, Canonicalize
from fxopt.testing import check_pass


def graph_of(gm: GraphModule) -> list[str]:
    """The graph as one line a node: ``target:ModuleType`` for modules, the node name otherwise."""
    return [
        f"{n.target}:{type(gm.get_submodule(str(n.target))).__name__}" if n.op == "call_module" else n.name
        for n in gm.graph.nodes
    ]


def run_pass(model: nn.Module, x: torch.Tensor) -> tuple[GraphModule, GraphModule, Canonicalize, bool]:
    """(Before graph, graph after the pass, the pass, modified); the outputs must match exactly."""
    torch.manual_seed(0)
    before = fxopt.trace(model, x)
    the_pass = Canonicalize()
    claimed = the_pass.finds_work(before)  # the pass manager's question before it copies the graph
    result = the_pass(copy.deepcopy(before))
    assert claimed == result.modified
    result.graph_module.recompile()  # the PassManager's step after every pass
    after = result.graph_module
    expected_out, out = before(x.clone()), after(x.clone())
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    return before, after, the_pass, result.modified


class Wrap(nn.Module):
    """``fn(self, x)`` as a module, so a case is one line."""

    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def fc() -> nn.Linear:
    return nn.Linear(4, 4)


X = torch.randn(2, 4)

# rule -> (model, Before, Expected)
REMOVED = {
    "dropout module": (nn.Sequential(fc(), nn.Dropout(0.5)), ["input_1", "0:Linear", "1:Dropout", "output"], ["input_1", "0:Linear", "output"]),
    "identity module": (nn.Sequential(nn.Identity(), fc()), ["input_1", "0:Identity", "1:Linear", "output"], ["input_1", "1:Linear", "output"]),
    "dropout call": (
        Wrap(lambda m, x: F.dropout(m.fc(x), 0.5, m.training), fc=fc()),
        ["x", "fc:Linear", "dropout", "output"], ["x", "fc:Linear", "output"],
    ),
    "contiguous": (Wrap(lambda m, x: m.fc(x).contiguous(), fc=fc()), ["x", "fc:Linear", "contiguous", "output"], ["x", "fc:Linear", "output"]),
    "same-shape view": (
        Wrap(lambda m, x: m.fc(x).view(2, 4).reshape(2, -1) + torch.reshape(x, (2, 4)), fc=fc()),
        ["x", "fc:Linear", "view", "reshape", "reshape_1", "add", "output"], ["x", "fc:Linear", "add", "output"],
    ),
    "identity permute": (
        Wrap(lambda m, x: m.fc(x).permute(0, 1) + torch.permute(x, (0, 1)) + x.permute(dims=(0, 1)), fc=fc()),
        ["x", "fc:Linear", "permute", "permute_1", "add", "permute_2", "add_1", "output"], ["x", "fc:Linear", "add", "add_1", "output"],
    ),
    "neutral arithmetic": (
        Wrap(lambda m, x: torch.add(torch.mul(m.fc(x) * 1 + 0 - 0, 1), 0.0) / 1, fc=fc()),
        ["x", "fc:Linear", "mul", "add", "sub", "mul_1", "add_1", "truediv", "output"], ["x", "fc:Linear", "output"],
    ),
}


def test_every_rule_has_a_case():
    assert set(REMOVED) == {rule for rule, _ in NOOP_RULES}


@pytest.mark.parametrize("rule", REMOVED)
def test_noop_is_removed(rule):
    model, before_graph, expected = REMOVED[rule]
    before, after, the_pass, modified = run_pass(model, X)
    assert graph_of(before) == before_graph
    assert modified
    assert graph_of(after) == expected
    assert set(the_pass.fired) == {rule}


class DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = fc(), fc()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.relu(self.unused(x) * 2)  # computed, never read
        return self.used(x)


def test_dead_code_and_its_submodules_are_removed():
    before, after, the_pass, modified = run_pass(DeadBranch(), X)
    assert graph_of(before) == ["x", "unused:Linear", "mul", "relu", "used:Linear", "output"]
    assert modified
    assert graph_of(after) == ["x", "used:Linear", "output"]
    assert not hasattr(after, "unused") and the_pass.fired == {}


def test_chains_of_noops_go_in_one_run():
    model = nn.Sequential(nn.Identity(), nn.Dropout(), nn.Flatten(0, 0), fc(), nn.Identity())
    before, after, the_pass, modified = run_pass(model, X)
    assert modified
    assert graph_of(after) == ["input_1", "2:Flatten", "3:Linear", "output"]  # Flatten is a module, not a rule
    assert the_pass.fired == {"identity module": 2, "dropout module": 1}


def _relu_(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = x * 2
    torch.relu_(y)  # result unused; the write is the effect
    return y


def _add_(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = x * 2
    y.add_(1)
    return y


def _inplace_relu(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = x - 1
    m.act(y)
    return y


# (model, Before = Expected): each looks like a no-op or dead code and is not
KEPT = {
    "x.add_(1) with its result unused": (Wrap(_add_), ["x", "mul", "add_", "output"]),
    "torch.relu_(x) with its result unused": (Wrap(_relu_), ["x", "mul", "relu_", "output"]),
    "ReLU(inplace=True) with its result unused": (Wrap(_inplace_relu, act=nn.ReLU(inplace=True)), ["x", "sub", "act:ReLU", "output"]),
    "F.dropout in training mode (p=0)": (Wrap(lambda m, x: F.dropout(x, 0.0)), ["x", "dropout", "output"]),
    "contiguous of a transposed tensor": (Wrap(lambda m, x: x.t().contiguous().view(-1)), ["x", "t", "contiguous", "view", "output"]),
    "view to another shape": (Wrap(lambda m, x: x.view(4, 2)), ["x", "view", "output"]),
    "view as another dtype": (Wrap(lambda m, x: x.view(torch.int32)), ["x", "view", "output"]),
    "permute that moves dims": (
        Wrap(lambda m, x: x.permute(1, 0).t() + torch.permute(x, dims=(1, 0)).t() + x.permute(dims=(1, 0)).t()),
        ["x", "permute", "t", "permute_1", "t_1", "add", "permute_2", "t_2", "add_1", "output"],
    ),
    "arithmetic that is not neutral": (Wrap(lambda m, x: (x + 1) * 2 - 0.5), ["x", "add", "mul", "sub", "output"]),
    "x * 1.0 that changes the dtype": (Wrap(lambda m, x: x.long() * 1.0), ["x", "long", "mul", "output"]),
    "x + 0 with alpha": (Wrap(lambda m, x: torch.add(x, 0, alpha=2) + x), ["x", "add", "add_1", "output"]),
}


@pytest.mark.parametrize("case", KEPT)
def test_what_only_looks_like_a_noop_is_kept(case):
    model, before_graph = KEPT[case]
    before, after, the_pass, modified = run_pass(model, X)
    assert graph_of(before) == before_graph
    assert not modified
    assert graph_of(after) == before_graph  # Expected = Before
    assert the_pass.fired == {}


def test_in_place_writes_stay_when_dead_code_beside_them_goes():
    def fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.add_(1)
        x.sum()  # dead
        return F.dropout(y, 0.3, m.training)

    before, after, the_pass, modified = run_pass(Wrap(fn), X)
    assert graph_of(before) == ["x", "mul", "add_", "sum_1", "dropout", "output"]
    assert modified
    assert graph_of(after) == ["x", "mul", "add_", "output"]


@pytest.mark.parametrize("case", [*REMOVED, "dead code", *KEPT])
def test_contract(case):
    model = DeadBranch() if case == "dead code" else (REMOVED.get(case) or KEPT[case])[0]
    check = check_pass("canonicalize", model, (X,))
    assert check.modified == (case not in KEPT)

