"""`fxopt.compile(..., safety="strict")`: the policy wired into compile, its refusals and the
evidence it leaves in the report and manifest (issue 15)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxopt
import fxopt.safety
from fxopt import models
from fxopt.output.output_folder import verify_output_folder
from fxopt.passes import PruneChannels


@pytest.fixture(scope="module")
def supervisor():
    torch.manual_seed(0)
    return models.create("safety_supervisor"), models.example_inputs("safety_supervisor")


def test_bundled_supervisor_compiles_strict_by_default_with_evidence(supervisor, tmp_path):
    model, inputs = supervisor
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs, save_to=tmp_path / "out")
    assert compiled.report.precision == "fp32"  # the spec's precision, not xavier's fp16
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    evidence = manifest["safety"]
    assert evidence["policy"] == "strict"
    assert evidence["ops"]["ops_checked"] == len(compiled.onnx_model.graph.node)
    assert evidence["determinism"]["bit_identical"] is True and evidence["determinism"]["threads"] == [1, 2]
    for where in ("graph", "onnx"):
        assert evidence["properties"][where]["failures"] == 0 and evidence["properties"][where]["cases"] > 500
    assert evidence["equivalence"]["rows"] > 500 and evidence["equivalence"]["rule_mismatches"] == 0
    assert sum("safety='strict'" in n for n in compiled.report.notes) == 4
    assert verify_output_folder(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "fp16"}, "safety_supervisor must be deployed at fp32; fp16 was requested"),
        ({"passes": ["prune"]}, "refuses lossy pass 'prune'"),
        ({"passes": [PruneChannels(amount=0.2)]}, "refuses lossy pass 'prune'"),
        ({"export": False}, "needs export=True"),
        ({"safety": "lenient"}, "safety must be one of"),
    ],
)
def test_strict_refusals(supervisor, kwargs, match):
    model, inputs = supervisor
    with pytest.raises((fxopt.SafetyPolicyError, fxopt.InputError), match=match):
        fxopt.compile(model, "xavier", example_inputs=inputs, **kwargs)


def test_safety_off_is_an_explicit_choice(supervisor):
    model, inputs = supervisor
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs, precision="fp16", safety="off")
    assert compiled.manifest["safety"] == {"policy": "off"}


def test_strict_on_any_model_checks_its_ops():
    # a model outside the registry: no property suite, but ops and determinism still checked
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    compiled = fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 4),), precision="fp32", safety="strict")
    assert set(compiled.manifest["safety"]) == {"policy", "ops", "determinism"}
    softmax = nn.Sequential(nn.Linear(4, 8), nn.Softmax(dim=-1)).eval()
    with pytest.raises(fxopt.SafetyPolicyError, match="Softmax"):
        fxopt.compile(softmax, "xavier", example_inputs=(torch.randn(1, 4),), precision="fp32", safety="strict")


class IgnoresInputFaults(fxopt.safety.SafetySupervisor):
    """A broken supervisor: the input-fault rule caps nothing."""

    def _rule_table(self, scene, alarm):
        no_cap = torch.full_like(scene.v, 1e4)
        rules = super()._rule_table(scene, alarm)
        return tuple((n, a, no_cap, no_cap) if n == "input_fault" else (n, a, s, c) for n, a, s, c in rules)


def test_strict_compile_refuses_a_supervisor_that_breaks_its_properties():
    torch.manual_seed(0)
    with pytest.raises(fxopt.SafetyPolicyError, match="input_fault_fails_safe on the graph"):
        fxopt.compile(IgnoresInputFaults().eval(), "xavier", example_inputs=models.example_inputs("safety_supervisor"))
