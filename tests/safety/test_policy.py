"""The strict safety compile policy: what it refuses, and the evidence it gives for the supervisor."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

import fxopt
import fxopt.safety.policy as policy
import fxopt.safety.properties as properties
from fxopt import models
from fxopt.errors import InputError, SafetyPolicyError
from fxopt.passinfra.registry import pass_class
from fxopt.safety.supervisor import SafetySupervisor
from fxopt.targets import get_target


class FlagsFaultsOnly(SafetySupervisor):
    """Deliberately broken: an input fault sets its bit but caps nothing."""

    def _rule_table(self, scene, alarm):
        no_cap = torch.full_like(scene.v, 1e4)
        rules = super()._rule_table(scene, alarm)
        return tuple((n, a, no_cap, no_cap) if n == "input_fault" else (n, a, s, c) for n, a, s, c in rules)


def compile_supervisor(model: SafetySupervisor) -> fxopt.CompiledModel:
    # safety="off": the broken supervisors must get through compile to be checked here
    return fxopt.compile(model.eval(), "xavier", example_inputs=models.example_inputs("safety_supervisor"), precision="fp32", safety="off")


@pytest.fixture(scope="module")
def supervisor():
    torch.manual_seed(0)
    model = models.create("safety_supervisor").eval()
    return model, compile_supervisor(model)


def test_the_supervisor_spec_asks_for_the_strict_policy():
    spec = models.spec("safety_supervisor")
    assert spec.safety == policy.STRICT and spec.precision == "fp32"
    assert spec.properties is not None and spec.equivalence is not None
    assert models.spec("pointpillars").safety is None


# --- check_strict_request ------------------------------------------------------------------------

def test_strict_refuses_lossy_passes_by_name():
    pipeline = [(name, pass_class(name).lossy) for name in ("canonicalize", "fold_batchnorm", "prune")]
    with pytest.raises(SafetyPolicyError, match=r"refuses lossy pass 'prune' for safety_supervisor"):
        policy.check_strict_request(pipeline, "fp32", "fp32", "safety_supervisor")
    with pytest.raises(SafetyPolicyError, match=r"lossy passes 'prune', 'quantize'"):
        policy.check_strict_request(pipeline + [("quantize", True)], "fp32", "fp32", "safety_supervisor")
    policy.check_strict_request(pipeline[:2], "fp32", "fp32", "safety_supervisor")  # non-lossy: accepted


def test_strict_refuses_a_precision_other_than_the_required_one():
    with pytest.raises(SafetyPolicyError, match="safety_supervisor must be deployed at fp32; fp16 was requested"):
        policy.check_strict_request([("canonicalize", False)], "fp16", "fp32", "safety_supervisor")
    with pytest.raises(SafetyPolicyError, match="refuses precision int8"):
        policy.check_strict_request([], "int8", None, "my_model")
    policy.check_strict_request([], "fp16", None, "my_model")  # no requirement: fp16 is not lossy by itself


# --- check_ops -------------------------------------------------------------------------------------

def test_the_supervisor_uses_only_audited_ops(supervisor):
    _, compiled = supervisor
    evidence = policy.check_ops(compiled.onnx_model, "xavier")
    assert evidence["ops_checked"] == len(compiled.onnx_model.graph.node) > 100
    assert evidence["allow_list"] == "tensorrt-8.5" and "Where" in evidence["op_types"]
    assert policy.check_ops(compiled.onnx_model, "cpu")["allow_list"] == "onnxruntime"


def scatter_model(domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    index = helper.make_tensor("index", TensorProto.INT64, [2], [0, 0])
    updates = helper.make_tensor("updates", TensorProto.FLOAT, [2], [1.0, 2.0])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ScatterElements", ["r", "index", "updates"], ["y"], name="accumulate", reduction="add", domain=domain),
    ]
    graph = helper.make_graph(nodes, "scatter", [x], [y], initializer=[index, updates])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_forbidden_op_is_refused_with_its_node_name():
    with pytest.raises(SafetyPolicyError, match=r"1 node\(s\).*accumulate \(ScatterElements\)") as caught:
        policy.check_ops(scatter_model(), "xavier")
    assert "relu" not in str(caught.value)
    with pytest.raises(SafetyPolicyError, match=r"accumulate \(my\.plugins\.ScatterElements\)"):
        policy.check_ops(scatter_model("my.plugins"), "xavier")


def test_a_target_without_an_audited_list_is_refused():
    future = dataclasses.replace(get_target("xavier"), name="thor", tensorrt_version="10.3")
    with pytest.raises(SafetyPolicyError, match="no audited op list for target 'thor' \\(tensorrt-10.3\\)"):
        policy.allowed_ops(future)


# --- check_determinism ------------------------------------------------------------------------------

def test_the_supervisor_is_bit_reproducible(supervisor):
    _, compiled = supervisor
    evidence = policy.check_determinism(compiled.onnx_model, models.example_inputs("safety_supervisor"), repeats=2, threads=(1, 2))
    assert evidence == {"runs": 4, "threads": [1, 2], "repeats": 2, "bit_identical": True,
                        "outputs": ["command", "risk", "learned_risk", "intervention"]}


def random_model() -> onnx.ModelProto:
    # y = x + U(0, 1): unseeded, so every run differs
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    nodes = [helper.make_node("RandomUniformLike", ["x"], ["u"]), helper.make_node("Add", ["x", "u"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "noisy", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_a_random_op_fails_the_determinism_check():
    with pytest.raises(SafetyPolicyError, match="output 'y' is not deterministic"):
        policy.check_determinism(random_model(), (np.zeros(16, np.float32),))


def test_a_difference_between_thread_counts_is_caught(supervisor, monkeypatch):
    _, compiled = supervisor
    real = onnxruntime.InferenceSession

    class LastBitOffWithTwoThreads(real):
        # a stand-in for a multi-threaded kernel that sums in another order
        def run(self, output_names, feed, *args, **kwargs):
            outputs = super().run(output_names, feed, *args, **kwargs)
            if self._sess_options.intra_op_num_threads == 2:
                outputs[1] = np.nextafter(outputs[1], np.float32(np.inf))
            return outputs

    monkeypatch.setattr(onnxruntime, "InferenceSession", LastBitOffWithTwoThreads)
    with pytest.raises(SafetyPolicyError, match=r"output 'risk' .* run 1 with 2 thread\(s\)"):
        policy.check_determinism(compiled.onnx_model, models.example_inputs("safety_supervisor"))
    policy.check_determinism(compiled.onnx_model, models.example_inputs("safety_supervisor"), threads=(1,))


# --- the property suite and the equivalence evidence --------------------------------------------------

def test_the_property_suite_passes_on_the_compiled_supervisor(supervisor):
    _, compiled = supervisor
    evidence = policy.run_property_suite(models.spec("safety_supervisor"), compiled.graph_module, compiled.onnx_model)
    for where in ("graph", "onnx"):
        counts = evidence[where]
        assert counts["properties"] == len(properties.PROPERTY_NAMES) and counts["failures"] == 0
        assert counts["by_property"]["input_fault_fails_safe"] == 380
        assert counts["cases"] == sum(counts["by_property"].values()) > 600


def test_the_property_suite_fails_on_a_broken_supervisor():
    torch.manual_seed(0)
    broken = compile_supervisor(FlagsFaultsOnly())
    with pytest.raises(SafetyPolicyError, match=r"input_fault_fails_safe on the graph .*input_fault_fails_safe on the onnx"):
        policy.run_property_suite(models.spec("safety_supervisor"), broken.graph_module, broken.onnx_model)
    with pytest.raises(InputError, match="no property suite"):
        policy.run_property_suite(models.spec("pointpillars"), broken.graph_module, broken.onnx_model)


def test_equivalence_evidence_and_its_refusal(supervisor):
    model, compiled = supervisor
    evidence = policy.equivalence_evidence(model, compiled.onnx_model, stratified=128, boundary=32)
    assert evidence["rows"] == 128 + 48 + 32 and evidence["rule_mismatches"] == 0
    assert evidence["max_abs_error"]["intervention"] == 0.0 and evidence["passed"] is True
    other = SafetySupervisor(margin=1.5).eval()
    other.load_state_dict(model.state_dict())
    with pytest.raises(SafetyPolicyError, match="NOT equivalent"):
        policy.equivalence_evidence(other, compiled.onnx_model, stratified=128, boundary=64)


def test_strict_checks_give_the_manifest_section(supervisor):
    model, compiled = supervisor
    spec = models.spec("safety_supervisor")
    section = policy.strict_checks(model, spec, compiled.graph_module, compiled.onnx_model,
                                   models.example_inputs("safety_supervisor"), "xavier")
    assert set(section) == {"policy", "ops", "determinism", "properties", "equivalence"}
    assert section["policy"] == "strict" and section["determinism"]["bit_identical"] is True
    assert section["properties"]["onnx"]["failures"] == 0 and section["equivalence"]["rows"] == 512 + 48 + 128
    # a model outside the registry gets the op and determinism checks only
    assert set(policy.strict_checks(model, None, compiled.graph_module, compiled.onnx_model,
                                    models.example_inputs("safety_supervisor"), "xavier")) == {"policy", "ops", "determinism"}


def test_the_suite_reads_the_compiled_supervisors_own_config():
    torch.manual_seed(0)
    model = models.create("safety_supervisor", num_sectors=16, v_max=10.0).eval()
    compiled = fxopt.compile(model, "cpu", example_inputs=models.example_inputs("safety_supervisor", num_sectors=16, v_max=10.0))
    evidence = policy.run_property_suite(models.spec("safety_supervisor"), compiled.graph_module, compiled.onnx_model, model=model)
    assert evidence["onnx"]["failures"] == 0
    assert evidence["onnx"]["by_property"]["input_fault_fails_safe"] == 2 * (16 * 5 + 3 * 3 + 6 + 3 * 5)
