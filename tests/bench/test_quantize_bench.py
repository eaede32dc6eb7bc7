"""The int8 bench's file analysis: Q/DQ counts, int8 op kinds, TensorRT fusion issues, coverage."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from bench_loader import load_bench
from onnx import TensorProto, helper, numpy_helper

import fxopt


def _bench_module():
    return load_bench('quantize')


def _xavier_int8():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    calib = [(torch.randn(1, 3, 8, 8),) for _ in range(2)]
    return fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8", calib_data=calib).onnx_model


def _q_between_conv_and_relu() -> onnx.ModelProto:
    """x -> Conv -> Q -> DQ -> Relu, and the conv output also feeds the Relu: the Q splits conv+ReLU."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["dq"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("r", "y")],
                              initializer=[w, scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fxopt_xavier_file_is_counted_and_has_no_fusion_issues() -> None:
    bench = _bench_module()
    model = _xavier_int8()
    stats = bench.qdq_stats(model)
    assert (stats.quantize, stats.dequantize) == (4, 4)  # two activations, two weights
    assert stats.op_kinds == {"Conv": 2} and [(k, a, w) for k, _, a, w in stats.weighted] == [("conv", True, True)] * 2
    assert bench.tensorrt_fusion_breaks(model) == []
    assert bench.coverage_gaps(stats, stats) == []


def test_a_q_between_conv_and_its_relu_and_a_dangling_dq_are_flagged() -> None:
    bench = _bench_module()
    model = _q_between_conv_and_relu()
    found = bench.tensorrt_fusion_breaks(model)
    assert found == ["Q on Conv conv output, which also feeds Relu", "DQ dq feeds Sigmoid sigmoid"]
    assert bench.coverage_gaps(bench.qdq_stats(_xavier_int8()), bench.qdq_stats(model)) is None  # 2 convs vs 1
