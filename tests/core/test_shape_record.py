"""`propagate_shapes` records what torch.fx's ShapeProp records, node for node."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxopt import models
from fxopt.frontend.tracing import propagate_shapes, tensor_metadata, trace, trace_with_outputs
from fxopt.verification.numerics import flatten_outputs


def _records(gm: torch.fx.GraphModule) -> dict[str, object]:
    return {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}


def _torch_records(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, object]:
    twin = copy.deepcopy(gm)
    for n in twin.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop("type", None)
    with torch.no_grad():
        ShapeProp(twin).propagate(*inputs)
    return _records(twin)


@pytest.mark.parametrize("name", ["camera_multitask", "motionnet", "pointpillars", "safety_supervisor"])
def test_bundled_models_record_what_shapeprop_records(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = models.create(name).eval(), models.example_inputs(name)
    gm = trace(model, inputs)
    propagate_shapes(gm, inputs)
    ours = _records(gm)
    assert ours == _torch_records(gm, inputs)
    assert sum(meta is not None for meta, _ in ours.values()) > 10


@pytest.mark.parametrize("name", ["camera_multitask", "pointpillars"])
def test_the_trace_records_shapes_and_outputs_in_the_run_that_checks_it(name: str) -> None:
    # no propagate_shapes: the trace's own run of the graph left the records, and its outputs are a later run's
    torch.manual_seed(0)
    model, inputs = models.create(name).eval(), models.example_inputs(name)
    gm, outputs = trace_with_outputs(model, inputs)
    assert _records(gm) == _torch_records(gm, inputs)
    with torch.no_grad():
        again = flatten_outputs(gm(*inputs))
    ours = flatten_outputs(outputs)
    assert len(ours) == len(again) > 1
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


class _Layouts(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        last = x.contiguous(memory_format=torch.channels_last)
        ones = x[:, :1, :1, :1]  # contiguous and channels-last at once: contiguous_format wins
        empty = x[:, :0]
        return last * 2, x.transpose(2, 3), ones, empty, x[:, :, ::2], x.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d), x.sum()


def test_layouts_and_odd_tensors_match_shapeprop() -> None:
    gm = torch.fx.symbolic_trace(_Layouts())
    inputs = (torch.randn(2, 3, 4, 5),)
    propagate_shapes(gm, inputs)
    ours = _records(gm)
    assert ours == _torch_records(gm, inputs)
    formats = [m.memory_format for m in ours["output"][0]] if ours["output"][0] else []
    assert torch.channels_last in formats and None in formats  # the checks above saw both kinds


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_and_sparse_tensors_match_torch() -> None:
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    per_tensor = torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 3, torch.quint8)
    per_channel = torch.quantize_per_channel(torch.randn(4, 3), torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    sparse = torch.randn(3, 3).to_sparse()
    for t in (per_tensor, per_channel, sparse, torch.zeros(0, 3), torch.randn(3, 1, 1, 1)):
        assert tensor_metadata(t) == _extract_tensor_metadata(t)


def test_a_failing_node_is_named_in_one_line() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x

    gm = torch.fx.symbolic_trace(Bad())
    with pytest.raises(RuntimeError, match=r"shape propagation failed at .*matmul.*RuntimeError"):
        propagate_shapes(gm, (torch.randn(2, 3),))


class _Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)  # a tensor constant: a get_attr of the trace's own
        return [y, x.flatten(1), y.shape[1] * x]


@pytest.mark.parametrize("model", [_Layouts(), _Constants()], ids=["layouts", "constants"])
def test_the_trace_evaluates_every_node_and_needs_no_run_of_the_graph(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.frontend.tracing as tracing

    def no_run(*args: object) -> None:
        raise AssertionError("the graph was run again")

    monkeypatch.setattr(tracing, "_run_failure_module", no_run)
    inputs = (torch.randn(2, 3, 4, 5),)
    gm, outputs = trace_with_outputs(model, inputs)
    assert _records(gm) == _torch_records(gm, inputs)
    with torch.no_grad():
        again = gm(*inputs)
    assert type(outputs) in (type(again), torch.fx.immutable_collections.immutable_list)
    assert [torch.equal(a, b) for a, b in zip(flatten_outputs(outputs), flatten_outputs(again))] == [True] * len(flatten_outputs(again))


class _FailsOnce(nn.Module):
    """A custom leaf whose first call fails: the trace cannot evaluate it, so the graph is run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:  # the first call checks the model runs; the second is the trace's evaluation
            raise RuntimeError("not yet")
        return x * 2


class _WithFailsOnce(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = _FailsOnce()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leaf(x) + 1


def test_a_node_the_trace_could_not_evaluate_makes_it_run_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxopt.frontend.tracing as tracing

    runs: list[int] = []
    real = tracing._run_failure_module
    monkeypatch.setattr(tracing, "_run_failure_module", lambda *a: (runs.append(1), real(*a))[1])
    x = torch.randn(2, 3)
    gm, outputs = trace_with_outputs(_WithFailsOnce(), (x,), leaf_modules=("leaf",))
    assert runs == [1]
    assert torch.equal(outputs, x * 2 + 1)
    assert _records(gm) == _torch_records(gm, (x,))
