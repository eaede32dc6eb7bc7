"""Torch-vs-ONNX equivalence check of the safety supervisor and its manifest."""

from __future__ import annotations

import json

import pytest
import torch

import fxopt
from fxopt.errors import InputError
from fxopt.safety.scenarios import example_batch
from fxopt.safety.supervisor import SafetySupervisor, SupervisorConfig, decode_intervention
from fxopt.safety.verify import (
    InputBox,
    check_equivalence,
    input_samples,
    safety_manifest,
    write_manifest,
)


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    model = SafetySupervisor().eval()
    return model, fxopt.compile(model, "cpu", example_inputs=example_batch()).onnx_model


def test_onnx_lowering_is_equivalent_over_the_box(lowered):
    model, onnx_model = lowered
    report = check_equivalence(model, onnx_model, stratified=1024, boundary=256)
    assert report.passed, str(report)
    assert report.samples == {"stratified": 1024, "corners": 48, "boundary": 256}
    assert report.rule_mismatches == [] and report.max_abs_error["intervention"] == 0.0
    assert report.max_abs_error["command"] <= 1e-5
    assert "equivalent on 1328 rows" in str(report)


def test_boundary_rows_straddle_the_stopping_envelope():
    config = SupervisorConfig()
    boundary = input_samples(config, stratified=8, boundary=256)["boundary"]
    codes = SafetySupervisor(config).eval()(*boundary)["intervention"].reshape(-1).tolist()
    braking = ["obstacle_brake" in decode_intervention(c) for c in codes]
    assert 0 < sum(braking) < len(braking)  # both sides of d_stop are sampled


def test_stratified_rows_cover_every_interval():
    config = SupervisorConfig()
    sectors, command, speed, health = input_samples(config, InputBox(command_margin=0.0), stratified=64)["stratified"]
    # Latin hypercube: each of 64 equal speed-target intervals holds exactly one row
    cells = torch.floor(command[:, 0] / config.v_max * 64).clamp(max=63).long()
    assert sorted(cells.tolist()) == list(range(64))
    assert 0.5 < float((sectors == config.max_range).float().mean()) < 0.9


def test_a_different_supervisor_is_reported_not_equivalent(lowered):
    model, onnx_model = lowered
    other = SafetySupervisor(margin=1.5).eval()
    other.load_state_dict(model.state_dict())
    report = check_equivalence(other, onnx_model, stratified=256, boundary=128)
    assert not report.passed and report.rule_mismatches
    assert {"kind", "row", "torch", "onnx"} <= set(report.rule_mismatches[0])
    with pytest.raises(InputError, match="needs a SafetySupervisor"):
        check_equivalence(torch.nn.Linear(2, 2), onnx_model)


def test_manifest_ties_the_report_to_the_file_and_weights(lowered, tmp_path):
    model, onnx_model = lowered
    report = check_equivalence(model, onnx_model, stratified=64, boundary=32)
    manifest = safety_manifest(model, onnx_model, report)
    path = write_manifest(tmp_path / "safety_manifest.json", manifest)
    loaded = json.loads(open(path).read())
    assert loaded["onnx_opset"] == 17 and loaded["config"]["num_sectors"] == 32
    assert loaded["equivalence"]["passed"] is True and len(loaded["onnx_sha256"]) == 64
    changed = SafetySupervisor().eval()
    assert safety_manifest(changed, onnx_model, report)["state_dict_sha256"] != manifest["state_dict_sha256"]
