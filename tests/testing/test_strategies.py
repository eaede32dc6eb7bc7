"""fxopt.testing strategies: every drawn model runs and traces, and every topology feature is drawn."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from torch import nn
from torch.fx import GraphModule

import fxopt
from fxopt.passes.canonicalize import Canonicalize
from fxopt.testing import ModelSpec, build_model
from fxopt.testing.coverage import op_kinds
from fxopt.testing.strategies import FEATURES, attention_blocks, convnets, mlps, model_specs, models
from fxopt.verification.numerics import compare_outputs

FIND_SETTINGS = settings(
    max_examples=2000, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
# the first example found, without shrinking (fast); shrinking has its own test
FIRST_FOUND = settings(FIND_SETTINGS, phases=[Phase.generate])


@functools.cache
def example_with(feature: str) -> ModelSpec:
    return find(model_specs(), FEATURES[feature], settings=FIRST_FOUND)


def _modules(gm: GraphModule, cls: type) -> list[nn.Module]:
    return [
        m for n in gm.graph.nodes if n.op == "call_module" and isinstance(m := gm.get_submodule(str(n.target)), cls)
    ]


def _output(gm: GraphModule):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def _called_twice(gm: GraphModule) -> bool:
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    return len(targets) != len(set(targets))


def _kinds(*names: str) -> Callable[[GraphModule], bool]:
    return lambda gm: bool(op_kinds(gm) & set(names))


# feature -> what its minimal model's traced graph must contain
EVIDENCE: dict[str, Callable[[GraphModule], bool]] = {
    "residual add": _kinds("operator.add", "torch.add", "Tensor.add_"),
    "in-place add": _kinds("Tensor.add_"),
    "in-place activation": lambda gm: _kinds("Tensor.relu_")(gm) or any(m.inplace for m in _modules(gm, nn.ReLU)),
    "concat": _kinds("torch.cat"),
    "split": _kinds("torch.functional.split", "torch.split"),
    "chunk": _kinds("Tensor.chunk"),
    "depthwise conv": lambda gm: any(m.groups == m.in_channels > 1 for m in _modules(gm, nn.Conv2d)),
    "grouped conv": lambda gm: any(1 < m.groups < m.in_channels for m in _modules(gm, nn.Conv2d)),
    "batchnorm": lambda gm: bool(_modules(gm, nn.modules.batchnorm._BatchNorm)),
    "max pool": _kinds("nn.MaxPool2d", "F.max_pool2d", "F._max_pool2d", "F.boolean_dispatch"),
    "avg pool": _kinds("nn.AvgPool2d", "F.avg_pool2d"),
    "adaptive pool": _kinds("nn.AdaptiveAvgPool2d", "nn.AdaptiveMaxPool2d"),
    "upsample": _kinds("nn.Upsample", "F.interpolate"),
    "transposed conv": _kinds("nn.ConvTranspose2d"),
    "flatten -> linear": lambda gm: _kinds("torch.flatten", "Tensor.flatten", "Tensor.view", "nn.Flatten")(gm) and bool(_modules(gm, nn.Linear)),
    "two inputs": lambda gm: sum(n.op == "placeholder" for n in gm.graph.nodes) == 2,
    "tuple output": lambda gm: isinstance(_output(gm), tuple),
    "dict output": lambda gm: isinstance(_output(gm), dict),
    "shared module": _called_twice,
    "attention (reshape/permute/matmul)": lambda gm: _kinds("torch.matmul", "operator.matmul")(gm) and _kinds("Tensor.softmax", "torch.softmax")(gm),
    "nn.MultiheadAttention": _kinds("nn.MultiheadAttention"),
    "data-dependent control flow": lambda gm: {leaf.module_type for leaf in fxopt.leaves_of(gm)} == {"DataGate"},
    "dropout / identity": lambda gm: Canonicalize()(gm).modified,
    "layernorm": _kinds("nn.LayerNorm"),
}


def test_every_feature_has_evidence():
    assert set(EVIDENCE) == set(FEATURES)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_feature_is_drawn_and_shows_in_the_traced_graph(feature):
    spec = example_with(feature)
    model, inputs = build_model(spec)
    gm = fxopt.trace(model, inputs)
    assert EVIDENCE[feature](gm), f"{feature}: not in the graph of {spec}"


def _runs_and_traces(drawn) -> None:
    model, inputs = drawn
    with torch.no_grad():
        eager = model(*inputs)
    gm = fxopt.trace(model, inputs)
    deviation = compare_outputs(gm(*inputs), eager)
    assert deviation.same_structure and deviation.max_abs <= 1e-6, deviation
    assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(eager))


@given(convnets())
def test_convnets_run_and_trace(drawn):
    _runs_and_traces(drawn)


@given(mlps())
def test_mlps_run_and_trace(drawn):
    _runs_and_traces(drawn)


@given(attention_blocks())
def test_attention_blocks_run_and_trace(drawn):
    _runs_and_traces(drawn)


@given(models())
def test_models_are_small_and_fast(drawn):
    model, inputs = drawn
    assert sum(p.numel() for p in model.parameters()) < 50_000
    assert all(x.numel() <= 2 * 4 * 12 * 12 for x in inputs)


def test_data_dependent_child_becomes_a_leaf_and_the_rest_is_traced():
    spec = find(model_specs(), lambda s: [b.kind for b in s.blocks].count("gate") == 1 and len(s.blocks) >= 3, settings=FIRST_FOUND)
    model, inputs = build_model(spec)
    gm = fxopt.trace(model, inputs)
    (leaf,) = fxopt.leaves_of(gm)
    assert leaf.module_type == "DataGate" and leaf.path.endswith("_gate")
    assert "control flow" in leaf.reason or "bool" in leaf.reason.lower()
    # the gate is one opaque call; the other blocks are traced through
    assert sum(n.op == "call_module" and n.target == leaf.path for n in gm.graph.nodes) == 1
    assert len([n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]) >= 3


def test_op_kinds_over_feature_examples():
    kinds: set[str] = set()
    for feature in FEATURES:
        model, inputs = build_model(example_with(feature))
        kinds |= op_kinds(fxopt.trace(model, inputs))
    # one example per feature covers at least 35 distinct modules / functions / methods
    assert len(kinds) >= 35, sorted(kinds)
    assert {"nn.Conv2d", "nn.Linear", "torch.cat", "operator.add"} <= kinds


def test_specs_shrink_to_small_readable_models():
    spec = find(model_specs(), FEATURES["shared module"], settings=FIND_SETTINGS)
    # the smallest model with a shared module: a stem, the shared block, features out
    assert [b.kind for b in spec.blocks][1:] == ["shared"]
    assert spec.head.params["variant"] == "features" and len(spec.inputs) == 1
    assert operator.contains(repr(spec), "shared(")
