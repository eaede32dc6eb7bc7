"""TensorRT lowering on a host without TensorRT: build plans and DLA placement from TensorRT 8.5's rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxopt
from fxopt.backends.onnx import export_onnx
from fxopt.backends.tensorrt import (
    build_engine,
    build_plan,
    cache_for_version,
    calibration_cache,
    dla_placement,
    placement_summary,
    read_calibration_cache,
    strip_qdq,
    tensorrt_available,
)


def placements(model, *inputs, target="xavier", precision="fp16"):
    exported = export_onnx(model.eval(), inputs, opset=17)
    return {r.op_type: r for r in dla_placement(exported.model, target, precision)}


def test_plain_convnet_is_dla_eligible():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 1))
    rows = placements(model, torch.randn(1, 3, 32, 32))
    assert {op: r.device for op, r in rows.items()} == {"Conv": "DLA", "Relu": "DLA", "MaxPool": "DLA"}


@pytest.mark.parametrize(
    "module, shape, op, reason",
    [
        (nn.Conv2d(3, 4, 33), (1, 3, 40, 40), "Conv", "kernel [33, 33] outside [1, 32]"),
        (nn.Conv2d(3, 4, 3, stride=9), (1, 3, 40, 40), "Conv", "stride [9, 9] outside [1, 8]"),
        (nn.Conv1d(3, 4, 3), (1, 3, 40), "Conv", "only 2-D convolution"),
        (nn.MaxPool2d(9), (1, 3, 40, 40), "MaxPool", "pooling window [9, 9] outside [1, 8]"),
        (nn.AdaptiveAvgPool2d(1), (1, 3, 16, 16), "GlobalAveragePool", "pooling window [16, 16]"),
        (nn.Softmax(dim=1), (1, 3, 4, 4), "Softmax", "no DLA implementation"),
    ],
)
def test_rules_send_unsupported_layers_to_gpu(module, shape, op, reason):
    row = placements(module, torch.randn(shape))[op]
    assert row.device == "GPU" and reason in row.reason


def test_concat_only_along_channels():
    class Cat(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, a, b):
            return torch.cat([a, b], dim=self.dim)

    x = (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    assert placements(Cat(1), *x)["Concat"].device == "DLA"
    assert placements(Cat(2), *x)["Concat"].device == "GPU"


def test_orin_runs_softmax_on_dla_and_fp32_never_on_dla():
    assert placements(nn.Softmax(dim=1), torch.randn(1, 3, 4, 4), target="orin")["Softmax"].device == "DLA"
    rows = placements(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), precision="fp32")
    assert rows["Conv"].device == "GPU" and "fp32" in rows["Conv"].reason


def test_cpu_target_has_no_dla():
    exported = export_onnx(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(fxopt.TargetError, match="no DLA cores"):
        dla_placement(exported.model, "cpu")


def test_build_plan_flags():
    plan = build_plan("xavier", "int8", dla_core=1)
    assert plan.trtexec[:2] == ["trtexec", "--onnx=model.onnx"]
    assert {"--fp16", "--int8", "--useDLACore=1", "--allowGPUFallback"} <= set(plan.trtexec)
    assert "build_engine('model.onnx', 'engine.plan', precision='int8', dla_core=1" in plan.script
    compile(plan.script, "build_engine.py", "exec")  # the script is valid Python
    assert "--fp16" not in build_plan("xavier", "fp32").trtexec
    with pytest.raises(fxopt.TargetError, match="DLA cores 0..1"):
        build_plan("xavier", "fp16", dla_core=2)
    with pytest.raises(fxopt.TargetError, match="does not use TensorRT"):
        build_plan("cpu", "fp32")


@pytest.mark.skipif(tensorrt_available(), reason="this host can build engines")
def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(fxopt.TargetError, match="needs the `tensorrt` package and a CUDA GPU"):
        build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "e.plan"))
    assert not (tmp_path / "e.plan").exists()


def test_compile_for_xavier_saves_plan_and_placement(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    compiled = fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 3, 8, 8),))
    compiled.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"build_engine.sh", "build_engine.py", "placement.md", "model.onnx"} <= names
    assert "--useDLACore=0" in (tmp_path / "build_engine.sh").read_text()
    conv_row = [r for r in compiled.report.layers if r.op == "Conv2d"][0]
    assert conv_row.placement == "DLA"
    assert any("DLA:" in n for n in compiled.report.notes)
    cpu = fxopt.compile(model, "cpu", example_inputs=(torch.randn(1, 3, 8, 8),))
    assert "files" not in cpu.report.extras


def test_placement_summary_counts_switches():
    exported = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), (torch.randn(1, 3, 8, 8),))
    summary = placement_summary(dla_placement(exported.model, "xavier", "fp16"))
    assert summary["dla"] >= 2 and summary["gpu"] >= 1 and summary["switches"] >= 2


# --- int8: the Q/DQ file on the GPU, the implicit twin and calibration.cache on DLA ------------------

def int8_compile(model, x, **kw):
    calib = [(torch.randn_like(x),) for _ in range(3)]
    return fxopt.compile(model.eval(), "xavier", example_inputs=(x,), precision="int8", calib_data=calib, **kw)


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c((self.b(self.a(x).relu()) + x).relu())


def qdq_scales(model):
    """{tensor: scale} of every activation QuantizeLinear in a Q/DQ file."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(values[n.input[1]].reshape(-1)[0]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in values}


def test_calibration_cache_parses_back_to_the_q_dq_scales_of_the_same_calibration(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    x = torch.randn(1, 3, 8, 8)
    compiled = int8_compile(model, x)
    compiled.save(tmp_path)
    header, cache = read_calibration_cache((tmp_path / "calibration.cache").read_text())
    assert header == "TRT-8502-EntropyCalibration2"
    expected = qdq_scales(compiled.onnx_model)
    assert len(expected) == 3 and {k: cache[k] for k in expected} == expected  # bit-exact float32
    # the implicit twin: no Q/DQ, the same tensor names, and the float function of the graph
    implicit = onnx.load(tmp_path / "model_dla.onnx")
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in implicit.graph.node}
    names = {o for n in implicit.graph.node for o in n.output} | {i.name for i in implicit.graph.input}
    assert set(cache) <= names
    onnx.checker.check_model(implicit)
    session = ort.InferenceSession(implicit.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], model.eval()(x).detach().numpy(), atol=1e-5)
    # a conv output feeding only a ReLU takes the ReLU's scale (TensorRT fuses them; clipping below 0 is a no-op)
    conv_out = next(n.output[0] for n in implicit.graph.node if n.op_type == "Conv")
    relu = next(n for n in implicit.graph.node if n.op_type == "Relu" and n.input[0] == conv_out)
    assert cache[conv_out] == cache[relu.output[0]]


def test_dla_build_uses_the_cache_and_the_gpu_build_the_q_dq_file():
    torch.manual_seed(0)
    compiled = int8_compile(ResidualBlock(), torch.randn(1, 4, 8, 8))
    files = compiled.report.extras["files"]
    gpu, dla = [line for line in files["build_engine.sh"].splitlines() if line.startswith("trtexec")]
    assert "--onnx=model.onnx" in gpu and "--calib" not in gpu and "--useDLACore" not in gpu
    assert {"--onnx=model_dla.onnx", "--calib=calibration.cache", "--int8", "--useDLACore=0"} <= set(dla.split())
    assert "calibration_cache='calibration.cache'" in files["build_engine.py"] and "build_engine('model.onnx'" in files["build_engine.py"]
    compile(files["build_engine.py"], "build_engine.py", "exec")
    assert any("DLA engine is built from model_dla.onnx" in n and "calibration.cache" in n for n in compiled.report.notes)
    # the placement report judges the file DLA builds (Q/DQ nodes would all read GPU)
    assert "QuantizeLinear" not in files["placement.md"]
    # the residual add is fused into conv b's epilogue: b's output takes the add's output scale
    _, cache = read_calibration_cache(files["calibration.cache"])
    implicit = onnx.load_from_string(files["model_dla.onnx"])
    add = next(n for n in implicit.graph.node if n.op_type == "Add")
    conv_b = [n for n in implicit.graph.node if n.op_type == "Conv"][1].output[0]
    assert conv_b in add.input and cache[conv_b] == cache[add.output[0]]


def test_cache_text_round_trip_and_version_header():
    scales = {"input": 0.0123, "/a/Conv_output_0": 1e-3, "x: y": 2.5}  # a name holding ': ' still parses
    header, back = read_calibration_cache(calibration_cache(scales))
    assert header == "TRT-8502-EntropyCalibration2"
    assert back == {k: float(np.float32(v)) for k, v in scales.items()}
    assert cache_for_version(calibration_cache(scales), "8.6.1.6").decode().startswith("TRT-8601-EntropyCalibration2\ninput: ")
    with pytest.raises(fxopt.TargetError, match="calibration cache is for int8"):
        build_plan("xavier", "fp16", calibration_cache="calibration.cache")


def test_strip_qdq_without_q_dq_is_the_same_graph():
    exported = export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 8, 8),)).model
    stripped, scales = strip_qdq(exported)
    assert scales == {} and [n.op_type for n in stripped.graph.node] == [n.op_type for n in exported.graph.node]


def test_doctests():
    import doctest

    import fxopt.backends.tensorrt as trt_backend

    result = doctest.testmod(trt_backend)
    assert result.attempted >= 3 and result.failed == 0


def test_a_concat_gives_its_output_scale_to_its_inputs():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x).relu(), self.b(x).relu()], dim=1))

    torch.manual_seed(0)
    files = int8_compile(Cat(), torch.randn(1, 3, 8, 8)).report.extras["files"]
    _, cache = read_calibration_cache(files["calibration.cache"])
    implicit = onnx.load_from_string(files["model_dla.onnx"])
    concat = next(n for n in implicit.graph.node if n.op_type == "Concat")
    convs = [n.output[0] for n in implicit.graph.node if n.op_type == "Conv"][:2]
    # concat inputs, the ReLUs before them and the convs before those: all at the concat's scale
    assert {cache[name] for name in [*concat.input, *convs]} == {cache[concat.output[0]]}


def test_the_cache_calibrator_hands_tensorrt_the_cache_and_no_batches():
    from types import SimpleNamespace

    from fxopt.backends.tensorrt import _cache_calibrator

    class Base:  # stands in for tensorrt.IInt8EntropyCalibrator2 (needs a GPU host)
        def __init__(self):
            self.base_init = True

    cache = cache_for_version(calibration_cache({"input": 0.5}), "8.5.2.2")
    calibrator = _cache_calibrator(SimpleNamespace(IInt8EntropyCalibrator2=Base), cache)
    assert isinstance(calibrator, Base) and calibrator.base_init  # TensorRT's base class is initialised
    assert calibrator.get_batch(["input"]) is None and calibrator.get_batch_size() == 1
    assert read_calibration_cache(calibrator.read_calibration_cache().decode()) == ("TRT-8502-EntropyCalibration2", {"input": 0.5})


# --- DLA latency model and the placement report's times ------------------------------------------

def _times(model, x, precision="fp16", target="xavier", devices=None):
    from fxopt.backends.dla_cost import placement_times
    from fxopt.backends.tensorrt import _shapes

    exported = export_onnx(model.eval(), (x,), opset=17)
    rows = dla_placement(exported.model, target, precision)
    placed = devices(rows) if devices else {r.node: r.device for r in rows}
    return placement_times(exported.model, placed, _shapes(exported.model), fxopt.get_target(target), precision), rows


def test_dla_layers_cost_more_than_gpu_layers_and_int8_less_than_fp16():
    from fxopt.costs.engine_cost import dla_kernel_latency_s, kernel_latency_s

    xavier = fxopt.get_target("xavier")
    big_conv = (4e9, 8e6)  # FLOPs, bytes
    assert dla_kernel_latency_s(xavier, "fp16", *big_conv) > kernel_latency_s(xavier, "fp16", "conv", big_conv[0], big_conv[1], 4e6, 1152)
    assert dla_kernel_latency_s(xavier, "int8", *big_conv) < dla_kernel_latency_s(xavier, "fp16", *big_conv)
    # a layer with no FLOPs is bound by its bytes
    assert dla_kernel_latency_s(xavier, "fp16", 0.0, 1e6) == pytest.approx(
        1e6 / (xavier.memory_bandwidth_bytes_per_s * xavier.dla.bandwidth_efficiency) + xavier.dla.layer_overhead_s)


def test_an_all_dla_convnet_frees_gpu_time_at_a_latency_cost():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    times, rows = _times(model, torch.randn(1, 3, 64, 64))
    assert all(r.device == "DLA" for r in rows)
    assert times.dla_s > times.gpu_only_s  # one DLA core is slower than the GPU
    assert times.dla_gpu_busy_s < times.gpu_only_s  # but the GPU only reformats in and out
    assert times.switches == 0
    # each layer's time on both devices is in the report
    heavy = [r.node for r in rows if r.op_type == "Conv"][-1]  # the 64->64 conv: compute bound on both
    gpu_s, dla_s = times.layer_s[heavy]
    assert gpu_s > 0 and dla_s is not None and dla_s > gpu_s


def test_gpu_fallback_switches_cost_reformats_and_hand_overs():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
    x = torch.randn(1, 3, 32, 32)
    all_dla, rows = _times(model, x)
    # the same graph with its middle conv forced onto the GPU: two more switches
    middle = [r.node for r in rows if r.op_type == "Conv"][1]
    forced, _ = _times(model, x, devices=lambda rs: {r.node: ("GPU" if r.node == middle else r.device) for r in rs})
    assert forced.switches == all_dla.switches + 2
    xavier = fxopt.get_target("xavier")
    gpu_conv, dla_conv = all_dla.layer_s[middle]
    # the forced placement pays the GPU conv instead of the DLA conv, plus at least two hand-overs
    assert forced.dla_s - all_dla.dla_s >= gpu_conv - dla_conv + 2 * xavier.dla.transition_s - 1e-9
    assert forced.dla_gpu_busy_s > all_dla.dla_gpu_busy_s


def test_no_dla_model_no_times_and_placement_md_states_them(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    x = torch.randn(1, 3, 64, 64)
    xavier = fxopt.get_target("xavier")
    bare = xavier.replace(name="xavier_no_dla_model", dla=None)
    from fxopt.backends.dla_cost import placement_times
    from fxopt.backends.tensorrt import _shapes
    exported = export_onnx(model.eval(), (x,), opset=17)
    assert placement_times(exported.model, {}, _shapes(exported.model), bare, "fp16") is None
    compiled = fxopt.compile(model, "xavier", example_inputs=(x,))
    compiled.save(tmp_path)
    text = (tmp_path / "placement.md").read_text()
    assert "| GPU only |" in text and "| DLA core 0, GPU fallback |" in text
    assert "frees" in text and "ms of GPU time per inference" in text
    assert any("estimated" in n and "on DLA0" in n for n in compiled.report.notes)


def test_scale_rules_carry_a_scale_as_tensorrt_fuses_and_no_further():
    from onnx import helper

    from fxopt.backends.tensorrt import propagated_scales

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Add", ["c", "r"], ["s"]),  # conv + scaled residual: the conv writes the sum
        helper.make_node("Relu", ["s"], ["y"]),  # forward across a keeper
        helper.make_node("Concat", ["p", "q"], ["cat"], axis=1),  # output -> inputs it alone reads
        helper.make_node("Relu", ["q"], ["q2"]),  # q is read twice: no scale flows back into it
        helper.make_node("MaxPool", ["m"], ["mp"], kernel_shape=[2, 2]),  # backwards into a single-use input
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    found = propagated_scales(model, {"r": 0.1, "s": 0.2, "cat": 0.3, "mp": 0.4})
    assert found == {"r": 0.1, "s": 0.2, "cat": 0.3, "mp": 0.4, "c": 0.2, "y": 0.2, "p": 0.3, "m": 0.4}


def test_every_split_costs_what_running_its_placement_costs():
    # the one-pass split walk gives, for each DLA layer i, what _run_s gives for "on_dla up to i, the GPU after"
    import random

    from fxopt.backends.dla_cost import Layer, _run_s, _split_runs

    rng = random.Random(0)
    xavier = fxopt.get_target("xavier")
    for _ in range(20):
        n = rng.randint(1, 12)
        layers = [Layer(f"n{i}", (f"n{i}",), "conv", 1e6, rng.uniform(1e3, 1e6), 1e3, 9.0, rng.uniform(1e2, 1e5)) for i in range(n)]
        on_dla = [rng.random() < 0.6 for _ in range(n)]
        g = [rng.uniform(1e-5, 1e-3) for _ in range(n)]
        d = [rng.uniform(1e-5, 1e-3) if dla else None for dla in on_dla]
        splits = list(_split_runs(xavier, "fp16", layers, on_dla, g, d))
        assert [i for i, _, _ in splits] == [i for i in range(n) if on_dla[i]]
        for i, total, busy in splits:
            mask = [on_dla[j] and j <= i for j in range(n)]
            assert (total, busy) == pytest.approx(_run_s(xavier, "fp16", layers, mask, g, d), rel=1e-12)


def test_placement_and_the_compatibility_check_read_weight_shapes_not_weight_values(monkeypatch):
    import fxopt.output.onnx_weights as onnx_weights
    from fxopt.backends.tensorrt_compat import check_tensorrt_compat

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 64, 4))
    exported = export_onnx(model.eval(), (torch.randn(1, 3, 8, 8),), opset=17)
    read: list[str] = []
    real = onnx_weights.tensor_values
    monkeypatch.setattr(onnx_weights, "tensor_values", lambda t: (read.append(t.name), real(t))[1])
    rows = dla_placement(exported.model, "xavier", "fp16")
    assert check_tensorrt_compat(exported.model, "xavier").ok
    assert [r.device for r in rows if r.op_type == "Conv"] == ["DLA", "DLA"]
    float_weights = {i.name for i in exported.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert len(float_weights) >= 6 and not float_weights & set(read)
    values = onnx_weights.InitializerValues(exported.model.graph)
    name = sorted(float_weights)[0]
    assert name in values and np.array_equal(values[name], numpy_helper.to_array(next(
        i for i in exported.model.graph.initializer if i.name == name)))
    assert values.shape("0.weight") == [16, 3, 3, 3]
    values["c"] = np.ones(1)
    assert values.shape("c") == [1]
    assert len(values) == len(exported.model.graph.initializer) + 1 and "c" in set(values)
