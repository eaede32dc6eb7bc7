"""The published Xavier figures' schema, profile calibration (recovery, bad input) and calibrated target files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fxopt
from fxopt.cli import main
from fxopt.costs.engine_cost import kernel_latency_s
from fxopt.costs.target_calibration import (
    ProfileFormatError,
    _match,
    calibrate_target,
    onnx_layer_work,
    read_trtexec_profile,
    write_profile,
)
from fxopt.targets import BYTES_PER_ELEMENT, get_target, load_target

DATA = Path(__file__).resolve().parents[2] / "bench" / "data" / "xavier_published.json"


# fields a record carries only where they apply (the file's "fields" says what each means)
OPTIONAL_FIELDS = {"in_fit", "layer_sum"}


def test_published_figures_follow_the_schema(monkeypatch):
    data = json.loads(DATA.read_text())
    records = data["records"]
    assert set(data["fields"]) - OPTIONAL_FIELDS == set(records[0])
    gpu = [r for r in records if r["device"] == "gpu"]
    assert len(gpu) >= 30
    monkeypatch.syspath_prepend(str(DATA.parents[1]))  # bench/xavier_networks.py builds what torchvision does not
    for r in records:
        assert set(data["fields"]) - OPTIONAL_FIELDS <= set(r) <= set(data["fields"]), r["network"]
        assert r["batch"] == 1 and r["input_shape"][0] == 1, r["network"]  # batch-1 figures only
        assert r["precision"] in ("fp32", "fp16", "int8") and r["device"] in ("gpu", "dla")
        assert r["metric"] in ("latency_ms", "throughput_fps") and r["value"] > 0
        assert r["source"].startswith("https://") and r["note"]
        assert r.get("in_fit", False) is False and r.get("layer_sum", True) is True, r["network"]  # present only to say so
        if r["build"] is None:  # kept, not modelled: the file says why
            assert r["family"] in data["not_modelled"], r["network"]
            continue
        module_name, _, factory = r["build"].partition(":")
        assert callable(getattr(importlib.import_module(module_name), factory)), r["build"]
    # one figure per network, input, precision, device and source
    keys = [(r["network"], tuple(r["input_shape"]), r["precision"], r["device"], r["source"]) for r in records]
    assert len(keys) == len(set(keys))


ENGINE_DATA = DATA.with_name("xavier_engine_time.json")
TIMINGS = ("engine", "c++ end-to-end", "python", "unstated")


def test_engine_time_figures_say_how_they_were_timed_and_where_they_were_read(monkeypatch):
    old = json.loads(DATA.read_text())
    data = json.loads(ENGINE_DATA.read_text())
    fields = set(old["fields"]) - OPTIONAL_FIELDS | {"build_kwargs"}
    monkeypatch.syspath_prepend(str(DATA.parents[1]))  # bench/xavier_networks.py builds what torchvision does not
    for r in data["records"]:
        assert set(r) == fields, r["network"]
        assert r["timing"] in TIMINGS and r["timing"] != "python", r["network"]  # Python-timed figures stay in the old file
        assert r["batch"] == 1 and r["input_shape"][0] == 1 and r["device"] == "gpu"
        assert r["source"].startswith("https://") and r["note"] and r["value"] > 0
        if r["build"] is None:  # kept, not modelled: the file says why
            assert r["family"] in data["not_modelled"], r["network"]
            continue
        module_name, _, factory = r["build"].partition(":")
        assert callable(getattr(importlib.import_module(module_name), factory)), r["build"]
    # the old file says how each of its figures was timed
    assert {r["timing"] for r in old["records"]} <= set(TIMINGS)
    assert all(r["timing"] == "python" for r in old["records"] if "torch2trt" in r["source"])
    keys = [(r["network"], tuple(r["input_shape"]), r["precision"], r["source"]) for r in data["records"]]
    assert len(keys) == len(set(keys))


def _synthetic_onnx(path: Path) -> None:
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),          # big compute-bound
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1"),                             # 1x1, wide
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=128),  # depthwise
        helper.make_node("Add", ["c1", "c2"], ["a0"], name="add0"),                                # memory-bound
        helper.make_node("Conv", ["a0", "w3"], ["c3"], name="conv3", strides=[4, 4]),             # small
        helper.make_node("GlobalAveragePool", ["c3"], ["p0"], name="pool0"),
        helper.make_node("Flatten", ["p0"], ["f0"], name="flatten0"),
        helper.make_node("Gemm", ["f0", "w4"], ["y"], name="fc0", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [weight("w0", 64, 64, 3, 3), weight("w1", 128, 64, 1, 1), weight("w2", 128, 1, 3, 3),
         weight("w3", 32, 128, 1, 1), weight("w4", 10, 32)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


LAYERS = ["conv0 + relu0", "conv1", "conv2", "add0", "conv3", "pool0", "fc0", "Reformatting CopyNode for Output Tensor 0 to fc0"]


def _synthetic_profile(tmp_path: Path, truth, precision="fp16") -> tuple[Path, Path]:
    """An ONNX model and a trtexec-style profile whose times the `truth` profile's formula gives."""
    model = tmp_path / "model.onnx"
    _synthetic_onnx(model)
    work = onnx_layer_work(model)
    width = BYTES_PER_ELEMENT[precision]
    records: list[dict] = [{"count": 100}]
    for name in LAYERS:
        [layer] = _match([type("L", (), {"name": name, "time_s": 1.0})()], work) or [None]
        ms = 0.004 if layer is None else 1e3 * kernel_latency_s(
            truth, precision, layer.kind, layer.flops, layer.elements * width, layer.size, layer.depth)
        records.append({"name": name, "timeMs": 100 * ms, "averageMs": ms, "medianMs": ms, "percentage": 1.0})
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(records))
    return model, profile


def test_calibration_recovers_known_efficiencies(tmp_path):
    xavier = get_target("xavier")
    truth = xavier.replace(
        op_efficiency={**xavier.op_efficiency, "conv": 0.31, "conv_depthwise": 0.07, "linear": 0.2},
        launch_overhead_s=23e-6, engine=xavier.engine.replace(bandwidth_efficiency=0.55),
    )
    _, profile = _synthetic_profile(tmp_path, truth)
    calibrated = calibrate_target(profile, "xavier")  # model.onnx beside the profile
    assert calibrated.name == "xavier_calibrated" and "profile.json" in calibrated.engine.source
    assert calibrated.efficiency("conv") == pytest.approx(0.31, rel=0.03)
    assert calibrated.efficiency("conv_depthwise") == pytest.approx(0.07, rel=0.05)
    assert calibrated.engine.bandwidth_efficiency == pytest.approx(0.55, rel=0.05)
    assert calibrated.launch_overhead_s == pytest.approx(23e-6, rel=0.1)
    # what the profile says nothing about stays the target's
    assert calibrated.engine.inference_overhead_s == xavier.engine.inference_overhead_s
    assert calibrated.peak_ops_per_s == xavier.peak_ops_per_s


def test_calibrated_profile_round_trips_through_its_file_and_the_cli(tmp_path, capsys):
    xavier = get_target("xavier")
    truth = xavier.replace(op_efficiency={**xavier.op_efficiency, "conv": 0.4}, launch_overhead_s=15e-6)
    model, profile = _synthetic_profile(tmp_path, truth)
    out = tmp_path / "calibrated.json"
    assert main(["calibrate-target", str(profile), "--onnx", str(model), "--name", "xavier_lab", "--out", str(out)]) == 0
    assert "xavier_lab" in capsys.readouterr().out
    loaded = load_target(out)
    assert fxopt.get_target("xavier_lab") is loaded
    assert loaded.efficiency("conv") == pytest.approx(0.4, rel=0.03)
    assert loaded == load_target(write_profile(loaded, tmp_path / "again.json"), register=False)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "<file>"),
        ('{"name": "conv0", "averageMs": 1}', "<top level>"),
        ('[{"count": 10}, {"averageMs": 0.1}]', "[1].name"),
        ('[{"count": 10}, {"name": "conv0", "timeMs": "fast"}]', "[1].timeMs"),
        ('[{"count": 10}, {"name": "conv0", "averageMs": -1}]', "[1].averageMs"),
        ('[{"count": 0}, {"name": "conv0", "averageMs": 1}]', "[0].count"),
    ],
)
def test_a_malformed_profile_names_the_file_and_the_field(tmp_path, content, field):
    bad = tmp_path / "bad_profile.json"
    bad.write_text(content)
    with pytest.raises(ProfileFormatError) as info:
        read_trtexec_profile(bad)
    assert isinstance(info.value, fxopt.FxoptError)
    assert info.value.field == field and str(bad) in str(info.value) and field in str(info.value)


def test_calibration_refuses_what_it_cannot_use(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text('[{"count": 1}, {"name": "nothing_here", "averageMs": 0.1}]')
    with pytest.raises(fxopt.InputError, match="pass --onnx"):
        calibrate_target(profile, "xavier")
    _synthetic_onnx(tmp_path / "model.onnx")
    with pytest.raises(ProfileFormatError, match="no layer name matches"):
        calibrate_target(profile, "xavier")
    with pytest.raises(fxopt.InputError, match="no EngineModel"):
        calibrate_target(profile, "cpu")
    assert main(["calibrate-target", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.json")]) == 2
    assert "cannot read profile" in capsys.readouterr().err


def test_a_malformed_target_file_names_the_file_and_the_field(tmp_path):
    data = get_target("xavier").to_dict()
    data["engine"]["bandwith_efficiency"] = 0.5  # misspelt
    bad = tmp_path / "target.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(fxopt.TargetError, match=r"target.json.engine: unknown field\(s\) \['bandwith_efficiency'\]"):
        load_target(bad)
    bad.write_text("[1, 2")
    with pytest.raises(fxopt.TargetError, match="target.json: not JSON"):
        load_target(bad)


def test_bvlc_deploy_nets_have_the_caffe_shapes(monkeypatch):
    """bench/xavier_networks.py's BVLC AlexNet and GoogLeNet: the deploy prototxts' parameter counts and pooled sizes."""
    import torch

    monkeypatch.syspath_prepend(str(DATA.parents[1]))
    nets = importlib.import_module("xavier_networks")
    alexnet, googlenet = nets.bvlc_alexnet().eval(), nets.bvlc_googlenet().eval()
    assert sum(p.numel() for p in alexnet.parameters()) == 60_965_224  # grouped conv2/4/5, fc6 on 256x6x6
    assert sum(p.numel() for p in googlenet.parameters()) == 6_998_552  # no auxiliary heads, no BatchNorm
    assert alexnet[:15](torch.randn(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    assert googlenet[:19](torch.randn(1, 3, 224, 224)).shape == (1, 832, 7, 7)  # Caffe's ceil pooling: 112 -> 56 -> 28 -> 14 -> 7
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in googlenet.modules()) == 2
