"""The reproducer: drawn models print as valid Python that rebuilds them, and failing examples show it."""

from __future__ import annotations

import ast

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import fxopt
from fxopt.testing import build_model, reproducer, spec_of
from fxopt.testing.strategies import model_specs, models
from fxopt.verification.numerics import compare_outputs


def _exec(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<reproducer>", "exec"), namespace)
    return namespace


@given(model_specs())
def test_reproducer_is_valid_python_that_rebuilds_an_equivalent_model(spec):
    model, inputs = build_model(spec)
    source = reproducer(model)
    assert source == reproducer(spec) and spec_of(model) == spec
    ast.parse(source)
    namespace = _exec(source)
    # the class alone, loaded with the drawn weights, computes the same function
    rebuilt = namespace["Model"]().eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert compare_outputs(rebuilt(*inputs), model(*inputs)).max_abs == 0.0
    # make_model() gives back the very same weights and example inputs
    again, again_inputs = namespace["make_model"]()
    assert fxopt.compiler.state_dict_sha256(again) == fxopt.compiler.state_dict_sha256(model)
    assert all(torch.equal(a, b) for a, b in zip(again_inputs, inputs, strict=True))


def test_reproducer_reads_like_a_model_file():
    spec = next(s for s in _draw_some() if len(s.blocks) >= 3)
    source = reproducer(spec)
    assert "class Model(nn.Module):" in source and "    def forward(self, x" in source
    assert "def make_model():" in source and f"torch.manual_seed({spec.seed})" in source
    assert "example_inputs = (torch.randn(" in source
    assert all(len(line) <= 140 for line in source.splitlines())


def _draw_some() -> list:
    found: list = []

    @settings(max_examples=10, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(model_specs())
    def collect(spec):
        found.append(spec)

    collect()
    return found


def test_reproducer_refuses_a_model_it_did_not_build():
    with pytest.raises(fxopt.InputError, match="needs a ModelSpec or a model drawn by fxopt.testing"):
        reproducer(nn.Linear(2, 2))


def test_failing_property_shrinks_and_shows_the_reproducer():
    @settings(max_examples=50, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(models())
    def no_model_shares_a_module(drawn):
        model, _ = drawn
        modules = [m for _, m in model.named_modules(remove_duplicate=False)]
        assert len(modules) == len({id(m) for m in modules}) and "_shared" not in repr(model)

    with pytest.raises(AssertionError) as caught:
        no_model_shares_a_module()
    shown = "\n".join(getattr(caught.value, "__notes__", []))
    # hypothesis prints the shrunk model as its source: a stem and the shared block, nothing else
    assert "class Model(nn.Module):" in shown and "def make_model():" in shown
    assert "_shared = " in shown and "the same weights a second time" in shown
    assert "self.b2_" not in shown and "logits" not in shown
