"""`copy_module` gives what `copy.deepcopy` gives for module trees: equal values, no aliasing with the
original, the aliasing inside the tree kept, and weights in the memo shared."""

from __future__ import annotations

import copy
import copyreg

import pytest
import torch
import torchvision
from torch import nn

from fxopt import models
from fxopt.frontend.copying import copy_children, copy_module


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.embed.weight  # tied weights
        self.again = self.embed  # one module under two names
        self.rnn = nn.LSTM(4, 4, batch_first=True)  # keeps its weights in a list too
        self.register_buffer("steps", torch.zeros(()))
        self.notes = {"kind": "tied", "sizes": [4, 4]}
        self.seen: list[int] = []
        self.embed.register_forward_hook(lambda m, i, o: o * 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.head(self.again(x)))
        return y + self.steps


def _cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    cases = [("tied", Tied().eval(), (torch.randn(2, 3, 4),)),
             ("resnet18", torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),)),
             ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small().eval(), (torch.randn(1, 3, 64, 64),))]
    cases += [(n, models.create(n).eval(), models.example_inputs(n)) for n in ("camera_multitask", "motionnet", "pointpillars")]
    return cases


@pytest.mark.parametrize("name, model, inputs", _cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_a_copy_equals_deepcopys_and_shares_nothing_with_the_original(name, model, inputs):
    fast, slow = copy_module(model), copy.deepcopy(model)
    with torch.no_grad():
        expected = model(*inputs)
        for out in (fast(*inputs), slow(*inputs)):
            assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(expected)))
    assert list(fast.state_dict()) == list(slow.state_dict()) == list(model.state_dict())
    originals = {id(t) for t in [*model.parameters(), *model.buffers(), *model.modules()]}
    assert not originals & {id(t) for t in [*fast.parameters(), *fast.buffers(), *fast.modules()]}
    assert [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]


def test_aliasing_inside_the_tree_is_kept_and_containers_are_new():
    model = Tied()
    c = copy_module(model)
    assert c.head.weight is c.embed.weight and c.again is c.embed
    assert c.rnn._flat_weights[0] is c.rnn.weight_ih_l0  # the LSTM's list points at the copy's own weights
    assert c.notes == model.notes and c.notes is not model.notes and c.notes["sizes"] is not model.notes["sizes"]
    c.seen.append(1)
    c.steps.add_(1)
    assert model.seen == [] and float(model.steps) == 0.0
    assert len(c.embed._forward_hooks) == 1


class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.seen = []
        self.lin.register_forward_hook(self._hook)  # a bound method of the parent
        self.impl = self._fast

    def _hook(self, module, inputs, output):
        self.seen.append(1)

    def _fast(self, x):
        return self.lin(x)

    def forward(self, x):
        return self.impl(x)


def test_bound_methods_bind_to_the_copy():
    model = Hooked()
    c = copy_module(model)
    c(torch.randn(1, 2))
    assert c.seen == [1] and model.seen == []  # the copy's hook and method run on the copy, not the user's module
    assert c.impl.__self__ is c


def test_weights_in_the_memo_are_shared_and_the_rest_copied():
    model = Tied()
    c = copy_module(model, {id(p): p for p in model.parameters()})
    assert c.embed.weight is model.embed.weight and c.embed is not model.embed
    assert c.steps is not model.steps  # a buffer not in the memo is copied


def test_a_graph_module_copied_through_its_children():
    model = models.create("motionnet").eval()
    inputs = models.example_inputs("motionnet")
    import fxopt

    gm = fxopt.trace(model, inputs)
    memo = {id(p): p for p in gm.parameters()}
    copy_children(gm, memo)
    c = copy.deepcopy(gm, memo)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(c(*inputs)),
                                                      torch.utils._pytree.tree_leaves(gm(*inputs))))
    assert next(c.parameters()) is next(gm.parameters())
    assert not {id(m) for m in gm.modules()} & {id(m) for m in c.modules()}
    assert str(c.graph) == str(gm.graph)


class _OwnState(nn.Module):
    """A module with its own __getstate__/__setstate__ (as LSTM has): left to deepcopy, so both run as under it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.cache = torch.ones(3)  # not state: dropped by __getstate__

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("cache", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.cache = torch.zeros(3)  # rebuilt on load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.cache[:2]


class _NewArgs(nn.Module):
    """A class that needs constructor arguments to be rebuilt: left to deepcopy."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __getnewargs__(self) -> tuple[int]:
        return (self.width,)


class _Derived(nn.Module):
    """A __getstate__ that builds part of the state on the fly (a new list per call)."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["derived"] = [self.i]
        return state


class _Reduced(nn.Module):
    """Copied through a copyreg reducer, which re-creates a handle."""

    def __init__(self) -> None:
        super().__init__()
        self.handle = "live"


def _reduce(m: _Reduced) -> tuple:
    return copyreg._reconstructor, (_Reduced, object, None), {**m.__dict__, "handle": "re-created"}


def test_state_built_on_the_fly_and_copyreg_reducers_copy_as_under_deepcopy():
    ours = copy_module(nn.Sequential(*[_Derived(i) for i in range(50)]))
    assert [m.derived[0] for m in ours] == list(range(50))  # no memo entry of a dead temporary reused
    copyreg.pickle(_Reduced, _reduce)
    try:
        assert copy_module(nn.Sequential(_Reduced()))[0].handle == copy.deepcopy(nn.Sequential(_Reduced()))[0].handle == "re-created"
    finally:
        copyreg.dispatch_table.pop(_Reduced, None)


def test_a_class_with_its_own_state_methods_is_copied_through_them_like_deepcopy():
    model = nn.Sequential(_OwnState(), nn.Conv1d(2, 2, 1), _NewArgs(5))
    ours, theirs = copy_module(model), copy.deepcopy(model)
    assert torch.equal(ours[0].cache, theirs[0].cache) and torch.equal(ours[0].cache, torch.zeros(3))
    assert ours[1].padding_mode == theirs[1].padding_mode == "zeros"
    assert ours[2].width == 5 and ours[2] is not model[2]
    assert ours[0].lin.weight is not model[0].lin.weight and torch.equal(ours[0].lin.weight, model[0].lin.weight)


def test_submodule_reads_the_children_tables_and_falls_back_to_get_submodule() -> None:
    import pytest

    from fxopt.frontend.inputs import submodule

    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()))
    model.extra = torch.nn.Linear(1, 1)
    for path, module in model.named_modules():
        assert submodule(model, path) is module is model.get_submodule(path)
    with pytest.raises(AttributeError):
        submodule(model, "0.9")
    with pytest.raises(AttributeError):
        submodule(model, "0.0.weight")  # a parameter, not a module: get_submodule's error
