"""Targets: the shipped profiles, the registry and its errors."""

from __future__ import annotations

import json

import pytest

import fxopt
from fxopt.targets import XAVIER, TargetProfile


def test_shipped_targets():
    assert {"xavier", "orin", "cpu"} <= set(fxopt.target_names())
    xavier = fxopt.get_target("xavier")
    assert xavier.max_onnx_opset == 17 and xavier.tensorrt_version == "8.5"
    assert xavier.dla_cores == 2 and xavier.precisions == ("fp32", "fp16", "int8")
    assert xavier.alignment("fp16") == 8 and xavier.alignment("int8") == 32
    assert xavier.peak_ops_per_s["int8"] > xavier.peak_ops_per_s["fp16"] > xavier.peak_ops_per_s["fp32"]


def test_unknown_target_lists_known_ones():
    with pytest.raises(fxopt.TargetError, match="unknown target 'tx2'; known targets: .*xavier"):
        fxopt.get_target("tx2")


def test_register_custom_target_and_refuse_duplicates():
    custom = XAVIER.replace(name="xavier_nx_test", peak_ops_per_s={"fp32": 0.8e12, "fp16": 6e12, "int8": 12e12}, dla_cores=2)
    fxopt.register_target(custom)
    assert fxopt.get_target("xavier_nx_test").peak_ops_per_s["fp16"] == 6e12
    with pytest.raises(fxopt.TargetError, match="already registered"):
        fxopt.register_target(custom)
    fxopt.register_target(custom, overwrite=True)


def test_profile_validation():
    with pytest.raises(fxopt.TargetError, match="default precision"):
        XAVIER.replace(name="bad", default_precision="int4")
    with pytest.raises(fxopt.TargetError, match="no peak throughput"):
        XAVIER.replace(name="bad", peak_ops_per_s={"fp32": 1.0})


def test_profile_is_frozen_data():
    with pytest.raises(AttributeError):
        XAVIER.max_onnx_opset = 18  # type: ignore[misc]
    with pytest.raises(TypeError):
        XAVIER.peak_ops_per_s["fp16"] = 1.0  # type: ignore[index]
    assert isinstance(XAVIER.to_dict()["peak_ops_per_s"], dict)
    assert isinstance(XAVIER, TargetProfile)


def test_profile_round_trips_through_plain_data_and_names_its_fit():
    data = json.loads(json.dumps(XAVIER.to_dict()))  # what a profile file holds
    assert TargetProfile.from_dict(data) == XAVIER
    assert isinstance(data["engine"]["half_size"], dict) and data["quant_scheme"]["symmetric"] is True
    assert "bench/xavier_latency.py" in XAVIER.engine.source  # the fitted numbers say where they come from
    with pytest.raises(fxopt.TargetError, match=r"lab.json: unknown field\(s\) \['peak_tops'\]"):
        TargetProfile.from_dict({**data, "peak_tops": 1}, where="lab.json")
    with pytest.raises(fxopt.TargetError, match="lab.json.engine: expected an object"):
        TargetProfile.from_dict({**data, "engine": 3}, where="lab.json")
